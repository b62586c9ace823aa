#!/usr/bin/env bash
# Interleaved A/B: main (690c57c) and the rate-sized depth, TARGET_BACKING=ram, ROUNDS (2) rounds a set.
set -u
cd /work/wt-depth
OUT=$1; SETS=${SETS:-5}
for s in $(seq "$SETS"); do
  for build in main depth; do
    case $build in
      main) N=/work/main/target/release/cairn-node; C=/work/main/target/release/cairnctl ;;
      depth) N=/tmp/rb-depth/cairn-node; C=/tmp/rb-depth/cairnctl ;;
    esac
    echo "== set $s build=$build $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    TARGET_BACKING=ram ROUNDS=${ROUNDS:-2} NODE=$N CTL=$C timeout 300 perf/rebuild-speed.sh 2>&1
  done
done >> "$OUT"

#!/usr/bin/env bash
# Before/after for a hot-path change: two builds of cairn-perf on the same file, interleaved
# (old then new, then new then old, ...), so drift and the file's state hit both alike. Prints each workload's median IOPS and
# p99 for both and the new/old ratios; JSON of every run goes to $OUT.
#
#   OLD=/path/to/old/release perf/ab.sh              # OLD holds the old cairn-perf binary
#   OLD=... NEW=target/release ROUNDS=3 RUNTIME=5 SIZE=2G FILE=/var/tmp/ab.img perf/ab.sh
#
# Workloads (4 KiB, 1 core, QD 32): a preallocated thin volume's randread and randwrite
# (`run --target volume`) and first writes on a fresh volume (`--fresh`), then the engine on
# the file (`run --target engine`) for reference. Each run is its own process, so a build whose
# reopen in one process is broken can still be measured.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OLD:?OLD must name the directory holding the old cairn-perf}"
NEW=${NEW:-target/release}
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
SIZE=${SIZE:-2G}
FILE=${FILE:-/var/tmp/cairn-ab.img}
OUT=${OUT:-perf/results/ab-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
WORKLOADS=("volume-randread:--target volume --rw randread"
  "volume-randwrite:--target volume --rw randwrite"
  "volume-first-write:--target volume --fresh --rw randwrite"
  "engine-randread:--target engine --rw randread")
for r in $(seq 1 "$ROUNDS"); do
  for w in "${WORKLOADS[@]}"; do
    name=${w%%:*}
    # Alternate which build goes first: a run leaves the file's blocks in a state (allocated,
    # zeroed, cached) that favours or penalises the next one.
    order="old new"
    [ $((r % 2)) -eq 0 ] && order="new old"
    for who in $order; do
      dir=$OLD
      [ "$who" = new ] && dir=$NEW
      # shellcheck disable=SC2086 # the workload's flags are words
      "$dir/cairn-perf" run ${w#*:} --file "$FILE" --size "$SIZE" --qd 32 --runtime "$RUNTIME" \
        --json >"$OUT/$name-$who-$r.json"
    done
  done
done
/usr/bin/python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
names = ["volume-randread", "volume-randwrite", "volume-first-write", "engine-randread"]
print(f"{'workload':20} {'old IOPS':>10} {'new IOPS':>10} {'new/old':>8} {'old p99':>9} {'new p99':>9}")
for n in names:
    runs = {w: [json.load(open(f"{out}/{n}-{w}-{r}.json")) for r in range(1, rounds + 1)] for w in ("old", "new")}
    iops = {w: statistics.median(x["iops"] for x in runs[w]) for w in runs}
    p99 = {w: statistics.median(x["lat_us"]["p99"] for x in runs[w]) for w in runs}
    ratio = statistics.median(n_["iops"] / o["iops"] for o, n_ in zip(runs["old"], runs["new"]))
    print(f"{n:20} {iops['old']:10.0f} {iops['new']:10.0f} {ratio:8.3f} {p99['old']:9.1f} {p99['new']:9.1f}")
PY

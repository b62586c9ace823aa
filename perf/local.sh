#!/usr/bin/env bash
# The README's figures on one machine, each a comparison run in one command. Writes JSON into
# $RESULTS. PARTS selects groups: engine spin volume null idle (default: all).
set -eu
P=${P:-target/release/cairn-perf}
RESULTS=${RESULTS:-perf/results/local}
FILE=${FILE:-/var/tmp/cairn-perf.img}
RUNTIME=${RUNTIME:-10}
PARTS=${PARTS:-engine spin volume null idle}
mkdir -p "$RESULTS"
cmp() { "$P" compare --file "$FILE" --size 4G --rounds 3 --runtime "$RUNTIME" --json "$@"; }
for part in $PARTS; do
  case $part in
  engine) # engine vs raw io_uring waiting in the kernel like fio
    cmp --rw randread --qd 32 >"$RESULTS/compare-randread-qd32.json"
    cmp --rw randwrite --qd 32 >"$RESULTS/compare-randwrite-qd32.json"
    cmp --rw randread --qd 1 >"$RESULTS/compare-randread-qd1.json" ;;
  spin) # engine vs raw io_uring that polls like the engine: the engine's own cost
    cmp --raw-wait spin --rw randread --qd 32 >"$RESULTS/compare-spin-randread-qd32.json"
    cmp --raw-wait spin --rw randwrite --qd 32 >"$RESULTS/compare-spin-randwrite-qd32.json"
    cmp --raw-wait spin --rw randread --qd 1 >"$RESULTS/compare-spin-randread-qd1.json" ;;
  volume) # a preallocated thin volume vs raw, then first writes on a fresh volume
    cmp --raw-wait spin --candidate volume --rw randread --qd 32 >"$RESULTS/compare-volume-randread-qd32.json"
    cmp --raw-wait spin --candidate volume --rw randwrite --qd 32 >"$RESULTS/compare-volume-randwrite-qd32.json"
    "$P" run --target volume --file "$FILE" --size 4G --rw randwrite --qd 32 --runtime "$RUNTIME" --json >"$RESULTS/volume-overwrite.json"
    "$P" run --target volume --fresh --file "$FILE" --size 4G --rw randwrite --qd 32 --runtime "$RUNTIME" --json >"$RESULTS/volume-first-write.json" ;;
  null)
    "$P" run --target engine --bdev null --size 4G --qd 128 --runtime 5 --json >"$RESULTS/null-qd128.json" ;;
  idle)
    "$P" idle --cores 2 --seconds 10 --json >"$RESULTS/idle.json" ;;
  esac
done

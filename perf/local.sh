#!/usr/bin/env bash
# The README's figures on this 2-core machine: engine vs raw disk (randread, randwrite at
# QD 32; randread at QD 1), the null bdev's ceiling, and idle CPU. Writes JSON into $RESULTS.
set -eu
P=${P:-target/release/cairn-perf}
RESULTS=${RESULTS:-perf/results/local}
FILE=${FILE:-/var/tmp/cairn-perf.img}
RUNTIME=${RUNTIME:-10}
mkdir -p "$RESULTS"
for rw in randread randwrite; do
  "$P" compare --file "$FILE" --size 4G --rw $rw --qd 32 --rounds 3 --runtime "$RUNTIME" --json >"$RESULTS/compare-$rw-qd32.json"
done
"$P" compare --file "$FILE" --size 4G --rw randread --qd 1 --rounds 3 --runtime "$RUNTIME" --json >"$RESULTS/compare-randread-qd1.json"
"$P" run --target engine --bdev null --size 4G --qd 128 --runtime 5 --json >"$RESULTS/null-qd128.json"
"$P" idle --cores 2 --seconds 10 --json >"$RESULTS/idle.json"

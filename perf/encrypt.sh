#!/usr/bin/env bash
# Encryption at rest through the daemon, as users run it (issue 16 item 5): one cairn-node on
# one core with its pool on a file, two 1 GiB volumes in that pool, one exported plain and one
# exported encrypted (`cairnctl node export add --key-file`), both filled once with fio; then
# fio's nbd engine runs 4 KiB random writes and random reads at QD 32 against each export in
# turn, the order alternating each round, for ROUNDS rounds. Prints the median of the rounds'
# encrypted/plain ratios of IOPS and of completion p99 (the target: IOPS >= 0.95x, p99 <= 1.1x).
# `cairn-perf compare --candidate volume --encrypt` measures the same layer in-process.
#
#   perf/encrypt.sh                     # RUNTIME=5 ROUNDS=5, pool in target/encrypt-bench
#
# Environment: RUNTIME seconds per job (5), ROUNDS (5), WORKDIR (where the pool file lives:
# put it on the disk to measure; default target/encrypt-bench, removed at the end), NODE_CPU
# (0), FIO_CPU (1: fio beside, not on, the node's core), OUT (perf/results/encrypt-daemon-DATE).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-5}
NODE_CPU=${NODE_CPU:-0}
FIO_CPU=${FIO_CPU:-1}
WORKDIR=${WORKDIR:-$PWD/target/encrypt-bench}
OUT=${OUT:-perf/results/encrypt-daemon-$(date +%F)}
NODE=target/release/cairn-node
CTL=target/release/cairnctl
for tool in fio python3 taskset; do
  command -v "$tool" >/dev/null || { echo "perf/encrypt.sh: needs $tool" >&2; exit 1; }
done
[ -x "$NODE" ] && [ -x "$CTL" ] ||
  { echo "perf/encrypt.sh: build first (cargo build --release -p cairn-node -p cairn-control)" >&2; exit 1; }
rm -rf "$WORKDIR"; mkdir -p "$WORKDIR" "$OUT"
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORKDIR"; }
trap cleanup EXIT
ADMIN=127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SOCK=$WORKDIR/nbd.sock
"$NODE" --cores "$NODE_CPU" --data-dir "$WORKDIR/data" --pool0-size 3G --nbd-listen off \
  --nbd-socket "$SOCK" --admin-listen "$ADMIN" --metrics-listen 127.0.0.1:0 --replica-listen off \
  --volume plain:1G >"$WORKDIR/node.log" 2>&1 &
PID=$!
for _ in $(seq 300); do [ -S "$SOCK" ] && "$CTL" node --addr "$ADMIN" pool ls >/dev/null 2>&1 && break; sleep 0.1; done
"$CTL" node --addr "$ADMIN" volume create enc 1G >/dev/null
head -c 64 /dev/urandom >"$WORKDIR/enc.key"
"$CTL" node --addr "$ADMIN" export add enc --key-file "$WORKDIR/enc.key" >/dev/null

uri() { echo "nbd+unix:///$1?socket=$SOCK"; }
for e in plain enc; do
  fio --name=fill --ioengine=nbd --uri="$(uri "$e")" --rw=write --bs=1M --iodepth=8 \
      --size=1000M --output-format=terse >/dev/null
done
job() { # NAME EXPORT RW
  taskset -c "$FIO_CPU" fio --name="$1" --ioengine=nbd --uri="$(uri "$2")" --rw="$3" --bs=4k \
      --iodepth=32 --numjobs=1 --time_based --runtime="$RUNTIME" --size=1000M --randrepeat=0 \
      --output-format=json >"$OUT/$1.json"
}
for r in $(seq "$ROUNDS"); do
  for rw in randwrite randread; do
    order="plain enc"; [ $((r % 2)) = 0 ] && order="enc plain"
    for e in $order; do job "$rw-$e-r$r" "$e" "$rw"; done
  done
done
python3 - "$OUT" "$ROUNDS" <<'EOF' | tee "$OUT/summary.txt"
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def job(name, rw):
    text = open(f"{out}/{name}.json").read()
    j = json.loads(text[text.index("{"):])["jobs"][0][rw.removeprefix("rand")]
    return j["iops"], j["clat_ns"]["percentile"]["99.000000"] / 1000
print(f"encrypted vs plain export through cairn-node, 4 KiB QD 32, medians of {rounds} rounds")
for rw in ("randwrite", "randread"):
    p = [job(f"{rw}-plain-r{r}", rw) for r in range(1, rounds + 1)]
    e = [job(f"{rw}-enc-r{r}", rw) for r in range(1, rounds + 1)]
    iops = statistics.median(b[0] / a[0] for a, b in zip(p, e))
    p99 = statistics.median(b[1] / a[1] for a, b in zip(p, e))
    print(f"{rw:10} IOPS plain {statistics.median(x[0] for x in p):>9.0f} encrypted "
          f"{statistics.median(x[0] for x in e):>9.0f}  ratio {iops:.3f}x   p99 ratio {p99:.3f}x")
EOF
echo "results: $OUT"

#!/usr/bin/env bash
# Replication benchmark: what synchronous replication costs, measured through NBD with fio's
# nbd engine (the client a user would run), as ratios to a nexus with one (local) replica
# measured in the same run.
#
#   perf/replication.sh                         # SIZE=1G RUNTIME=10 ROUNDS=3 PARTS="ram file"
#   SIZE=256M RUNTIME=3 ROUNDS=1 perf/replication.sh    # smoke
#
# Set-up, two cairn-node processes on loopback:
#   A (the attach node): reactor on core A_CPU (0), NBD on a unix socket, the local replica
#     "vol", and a plain export "raw" of the same kind of backing (no nexus) for reference.
#   B (the replica node): reactor on core B_CPU (1), replica server on 127.0.0.1, replica
#     "vol".
#   fio is not pinned: on a 2-core machine client, nexus and replica share the cores, which
#   is the set-up the targets are stated for.
# Parts: `ram` backs both replicas with RAM bdevs (--replica-malloc), so only replication's own
# cost shows; `file` backs them with volumes in pool files in WORKDIR (--replica-volume).
# Before measuring, one sequential write fills both replicas and raw: RAM bdevs fault their
# pages in on first touch and volumes allocate clusters on first write, and either would
# slow the first round only.
# Each round creates the nexus with 1 replica (local), measures, destroys it, creates it with
# 2 (local + B), measures, destroys it; rounds interleave so drift hits both alike.
# Jobs: 4 KiB randwrite QD 32 (IOPS) and QD 1 (completion latency p50 and mean), 1 job, time
# based. Each round also runs them on the plain export "raw" (no nexus) and, in the `file`
# part, on a file in WORKDIR with fio's io_uring engine and O_DIRECT: the disk's own figure.
#
# Environment: SIZE (1G), RUNTIME seconds per job (10), ROUNDS (3), PARTS ("ram file"),
# NODE and CTL (binaries to measure, e.g. an older build for a before/after comparison; default
# target/release/cairn-node and cairnctl, built first), WORKDIR (target/replication-bench, removed at the end unless KEEP=1), OUT
# (perf/results/replication-DATE), A_CPU (0), B_CPU (1), PORT_BASE (21809), IDLE (the nodes'
# --idle, adaptive).
# CPU: each fio job also records the CPU-seconds both nodes used during it (NAME.cpu), and the
# summary gives node CPU per I/O (µs) for 1 and 2 replicas.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-ram file}
WORKDIR=${WORKDIR:-$PWD/target/replication-bench}
OUT=${OUT:-perf/results/replication-$(date +%Y-%m-%d)}
A_CPU=${A_CPU:-0}
B_CPU=${B_CPU:-1}
PORT_BASE=${PORT_BASE:-21809}
IDLE=${IDLE:-adaptive}

for t in fio nbdinfo python3; do
  command -v "$t" >/dev/null || { echo "replication bench: $t not found (apt-get install fio libnbd-bin python3)" >&2; exit 1; }
done
if [ -z "${NODE:-}" ]; then
  cargo build --release -q -p cairn-node -p cairn-control
fi
NODE=${NODE:-target/release/cairn-node}
CTL=${CTL:-target/release/cairnctl}

bytes() { numfmt --from=iec "${1%B}"; }
SIZE_BYTES=$(bytes "$SIZE")
POOL_BYTES=$((SIZE_BYTES * 2 + 512 * 1024 * 1024))
SOCK=$WORKDIR/a.sock
A_ADMIN=127.0.0.1:$((PORT_BASE + 1))
B_ADMIN=127.0.0.1:$((PORT_BASE + 2))
B_REPLICA=127.0.0.1:$((PORT_BASE + 3))

mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORKDIR"
}
trap cleanup EXIT

# node NAME LOG ARGS...: starts cairn-node and waits for its ready line.
node() {
  local name=$1; shift
  "$NODE" --metrics-listen 127.0.0.1:0 --nbd-listen off --idle "$IDLE" "$@" >"$WORKDIR/$name.out" 2>"$WORKDIR/$name.log" &
  PIDS+=($!)
  for _ in $(seq 600); do
    grep -q '^cairn-node ready' "$WORKDIR/$name.out" 2>/dev/null && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "replication bench: node $name did not start:" >&2; tail -20 "$WORKDIR/$name.log" >&2; exit 1
}

# nodes_cpu_s: CPU-seconds (user + system) used so far by every cairn-node of the set-up
# (/proc/PID/stat fields 14 and 15, in clock ticks).
nodes_cpu_s() {
  local ticks=0 p
  for p in "${PIDS[@]}"; do
    ticks=$((ticks + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$ticks $(getconf CLK_TCK)" | awk '{printf "%.3f\n", $1 / $2}'
}

# fio_job NAME EXPORT QD: one randwrite job through NBD; JSON to OUT, and the CPU-seconds
# the nodes used during it to OUT/NAME.cpu.
fio_job() {
  local name=$1 export=$2 qd=$3
  local cpu0; cpu0=$(nodes_cpu_s)
  fio --name="$name" --ioengine=nbd --uri="nbd+unix:///$export?socket=$SOCK" \
      --rw=randwrite --bs=4k --iodepth="$qd" --numjobs=1 --time_based --runtime="$RUNTIME" \
      --size="$SIZE_BYTES" --randrepeat=0 --output-format=json >"$OUT/$name.json"
  echo "$cpu0 $(nodes_cpu_s)" | awk '{printf "%.3f\n", $2 - $1}' >"$OUT/$name.cpu"
}

# disk_job NAME QD: the same job straight on the disk (a file in WORKDIR, O_DIRECT).
disk_job() {
  fio --name="$1" --ioengine=io_uring --direct=1 --filename="$WORKDIR/disk.img" \
      --rw=randwrite --bs=4k --iodepth="$2" --numjobs=1 --time_based --runtime="$RUNTIME" \
      --size="$SIZE_BYTES" --randrepeat=0 --output-format=json >"$OUT/$1.json"
}

nexus_up() {
  local replicas=("--replica" "local")
  [ "$1" = 2 ] && replicas+=("--replica" "$B_REPLICA")
  # Every round re-creates the nexus over replicas the previous one opened: a takeover. A
  # replica the previous nexus left out (b after a 1-replica round) holds an older data
  # generation and is rebuilt first; measure only once every replica is in sync.
  "$CTL" node --addr "$A_ADMIN" nexus create vol "${replicas[@]}" --takeover >/dev/null
  for _ in $(seq 1200); do
    "$CTL" node --addr "$A_ADMIN" nexus show vol | grep -q online && break
    sleep 0.1
  done
  "$CTL" node --addr "$A_ADMIN" nexus show vol | grep -q online
  "$CTL" node --addr "$A_ADMIN" export add vol --nexus >/dev/null
}

nexus_down() {
  "$CTL" node --addr "$A_ADMIN" export remove vol >/dev/null
  "$CTL" node --addr "$A_ADMIN" nexus destroy vol >/dev/null
}

run_part() {
  local part=$1
  rm -rf "$WORKDIR"; mkdir -p "$WORKDIR"
  local a_kind=(--replica-malloc "vol:$SIZE_BYTES" --malloc "raw:$SIZE_BYTES")
  local b_kind=(--replica-malloc "vol:$SIZE_BYTES")
  if [ "$part" = file ]; then
    a_kind=(--replica-volume "vol:$SIZE_BYTES" --volume "raw:$SIZE_BYTES" --pool0-size "$POOL_BYTES")
    b_kind=(--replica-volume "vol:$SIZE_BYTES" --pool0-size "$POOL_BYTES")
  fi
  node a --cores "$A_CPU" --data-dir "$WORKDIR/a" --nbd-socket "$SOCK" --admin-listen "$A_ADMIN" \
       --replica-listen off "${a_kind[@]}"
  node b --cores "$B_CPU" --data-dir "$WORKDIR/b" --admin-listen "$B_ADMIN" \
       --replica-listen "$B_REPLICA" "${b_kind[@]}"
  # Fill both replicas and raw: the measured writes overwrite.
  nexus_up 2
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///vol?socket=$SOCK" --rw=write --bs=1M \
      --iodepth=8 --size="$SIZE_BYTES" --output-format=terse >/dev/null
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///raw?socket=$SOCK" --rw=write --bs=1M \
      --iodepth=8 --size="$SIZE_BYTES" --output-format=terse >/dev/null
  "$CTL" node --addr "$A_ADMIN" nexus show vol | grep -q online
  nexus_down
  if [ "$part" = file ]; then
    fio --name=fill --ioengine=io_uring --direct=1 --filename="$WORKDIR/disk.img" --rw=write \
        --bs=1M --iodepth=8 --size="$SIZE_BYTES" --output-format=terse >/dev/null
  fi
  for round in $(seq "$ROUNDS"); do
    for qd in 32 1; do
      [ "$part" = file ] && disk_job "$part-disk-qd$qd-r$round" "$qd"
      fio_job "$part-raw-qd$qd-r$round" raw "$qd"
      for n in 1 2; do
        nexus_up "$n"
        fio_job "$part-nexus$n-qd$qd-r$round" vol "$qd"
        nexus_down
      done
    done
  done
  for p in "${PIDS[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
  PIDS=()
}

for part in $PARTS; do
  echo "== $part"
  run_part "$part"
done

python3 - "$OUT" "$ROUNDS" "$PARTS" <<'PY' | tee "$OUT/summary.txt"
import json, os, statistics, sys
out, rounds, parts = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
def job(name):
    text = open(f"{out}/{name}.json").read()
    # fio's nbd engine prints "fio: connected to NBD server" before the report.
    j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    return j["iops"], j["clat_ns"]["percentile"]["50.000000"] / 1000.0, j["clat_ns"]["mean"] / 1000.0
def med(part, kind, qd, i):
    if not os.path.exists(f"{out}/{part}-{kind}-qd{qd}-r1.json"):
        return None
    return statistics.median(job(f"{part}-{kind}-qd{qd}-r{r}")[i] for r in range(1, rounds + 1))
def per_round(part, qd, i, f):
    return statistics.median(
        f(job(f"{part}-nexus2-qd{qd}-r{r}")[i], job(f"{part}-nexus1-qd{qd}-r{r}")[i])
        for r in range(1, rounds + 1))
def cell(v, fmt):
    return "-" if v is None else format(v, fmt)
# "2 vs 1": the median of per-round ratios (IOPS) or differences (latency).
print(f"{'part':5} {'what':30} {'1 replica':>10} {'2 replicas':>10} {'2 vs 1':>9} {'no nexus':>9} {'disk':>9}")
rows = [("4K randwrite QD32 IOPS", 32, 0, ".0f", lambda a, b: a / b, "x"),
        ("4K randwrite QD1 clat p50 us", 1, 1, ".1f", lambda a, b: a - b, "us"),
        ("4K randwrite QD1 clat mean us", 1, 2, ".1f", lambda a, b: a - b, "us")]
for part in parts:
    for what, qd, i, fmt, f, unit in rows:
        one, two = med(part, "nexus1", qd, i), med(part, "nexus2", qd, i)
        d = per_round(part, qd, i, f)
        d = f"{d:.3f}x" if unit == "x" else f"{d:+.1f}us"
        print(f"{part:5} {what:30} {cell(one, fmt):>10} {cell(two, fmt):>10} {d:>9} "
              f"{cell(med(part, 'raw', qd, i), fmt):>9} {cell(med(part, 'disk', qd, i), fmt):>9}")
# Node CPU per I/O: both cairn-node processes (nexus node + replica node), µs of CPU per I/O.
def cpu_per_io(name):
    text = open(f"{out}/{name}.json").read()
    ios = json.loads(text[text.index("{"):])["jobs"][0]["write"]["total_ios"]
    return float(open(f"{out}/{name}.cpu").read()) / max(ios, 1) * 1e6
for part in parts:
    for qd in (32, 1):
        if not os.path.exists(f"{out}/{part}-nexus1-qd{qd}-r1.cpu"):
            continue
        c1, c2 = (statistics.median(cpu_per_io(f"{part}-nexus{n}-qd{qd}-r{r}") for r in range(1, rounds + 1))
                  for n in (1, 2))
        print(f"{part:5} {'node CPU us per I/O, QD' + str(qd):30} {c1:>10.2f} {c2:>10.2f} {c2 / c1:>8.3f}x")
PY
echo "results: $OUT"

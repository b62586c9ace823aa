#!/usr/bin/env bash
# Replication benchmark: what synchronous replication costs, measured through NBD with fio's
# nbd engine (the client a user would run), as ratios to a nexus with one (local) replica
# measured in the same run.
#
#   perf/replication.sh                         # SIZE=1G RUNTIME=10 ROUNDS=3 PARTS="ram file resync"
#   SIZE=256M RUNTIME=3 ROUNDS=1 perf/replication.sh    # smoke
#   perf/replication.sh resync                  # only the resync part (PARTS=resync)
#
# Set-up of parts `ram` and `file`, two cairn-node processes on loopback:
#   A (the attach node): reactor on core A_CPU (0), NBD on a unix socket, the local replica
#     "vol", and a plain export "raw" of the same kind of backing (no nexus) for reference.
#   B (the replica node): reactor on core B_CPU (1), replica server on 127.0.0.1, replica
#     "vol".
#   fio is not pinned by default: on a 2-core machine client, nexus and replica then share
#   the cores, and the 1-replica baseline gets B's idle core for fio while the 2-replica run
#   does not. FIO_CPU=A_CPU pins fio beside the nexus instead, the layout of two machines:
#   machine A (core A_CPU) runs the application and the nexus, machine B (core B_CPU) only the
#   replica, so neither case gets a core that a real deployment would not have.
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
# Part `resync` (issue 13's targets; `run_resync` below says what it measures) puts resync
# and rebuild under a paced client load and reports their stalls, time and bytes copied.
#
# Environment: SIZE (1G), RUNTIME seconds per job (10), ROUNDS (3), PARTS ("ram file resync",
# or the arguments),
# NODE and CTL (binaries to measure, e.g. an older build for a before/after comparison; default
# target/release/cairn-node and cairnctl, built first), WORKDIR (target/replication-bench, removed at the end unless KEEP=1), OUT
# (perf/results/replication-DATE), A_CPU (0), B_CPU (1), FIO_CPU (unset: fio unpinned; a core
# list pins fio with taskset), PORT_BASE (21809), IDLE (the nodes'
# --idle, adaptive), SCHED (other; fifo: both nodes under `chrt -f 5`, root only, sleeping
# reactors only: separates waiting for a CPU from everything else, docs/replication.md "Stalls").
# CPU: each fio job also records the CPU-seconds both nodes used during it (NAME.cpu) and the
# attach node alone (NAME.cpua), and the summary gives node CPU per I/O (µs) for 1 and 2
# replicas, the attach node's, and the client's (fio's own usr + sys CPU); and the time the nodes' threads
# waited on the run queue, runnable but not running (NAME.sched, /proc/PID/task/*/schedstat),
# which the summary gives per second of the job: the stalls a busy or shared machine adds.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-ram file resync}
[ $# -gt 0 ] && PARTS="$*"

WORKDIR=${WORKDIR:-$PWD/target/replication-bench}
OUT=${OUT:-perf/results/replication-$(date +%Y-%m-%d)}
A_CPU=${A_CPU:-0}
B_CPU=${B_CPU:-1}
FIO_PIN=()
[ -n "${FIO_CPU:-}" ] && FIO_PIN=(taskset -c "$FIO_CPU")
PORT_BASE=${PORT_BASE:-21809}
IDLE=${IDLE:-adaptive}
SCHED=${SCHED:-other}
case $SCHED in
  other) WRAP=() ;;
  fifo) WRAP=(chrt -f 5) ;;
  *) echo "replication bench: SCHED is other or fifo, not $SCHED" >&2; exit 1 ;;
esac

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
  "${WRAP[@]}" "$NODE" --metrics-listen 127.0.0.1:0 --nbd-listen off --idle "$IDLE" "$@" >"$WORKDIR/$name.out" 2>"$WORKDIR/$name.log" &
  PIDS+=($!)
  for _ in $(seq 600); do
    grep -q '^cairn-node ready' "$WORKDIR/$name.out" 2>/dev/null && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "replication bench: node $name did not start:" >&2; tail -20 "$WORKDIR/$name.log" >&2; exit 1
}

# nodes_cpu_s [PID…]: CPU-seconds (user + system) used so far by the given cairn-node
# processes, default every one of the set-up (/proc/PID/stat fields 14 and 15, in clock ticks).
nodes_cpu_s() {
  local ticks=0 p
  [ $# -gt 0 ] || set -- "${PIDS[@]}"
  for p in "$@"; do
    ticks=$((ticks + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$ticks $(getconf CLK_TCK)" | awk '{printf "%.3f\n", $1 / $2}'
}

# nodes_wait_s: seconds every thread of every cairn-node of the set-up has waited on a run
# queue so far (schedstat's second field, in ns).
nodes_wait_s() {
  local p
  for p in "${PIDS[@]}"; do cat /proc/"$p"/task/*/schedstat; done | awk '{ w += $2 } END { printf "%.3f\n", w / 1e9 }'
}

# fio_job NAME EXPORT QD: one randwrite job through NBD; JSON to OUT, the CPU-seconds the
# nodes used during it to OUT/NAME.cpu (the attach node's alone, PIDS[0], to OUT/NAME.cpua) and
# the seconds they waited for a CPU to OUT/NAME.sched.
fio_job() {
  local name=$1 export=$2 qd=$3
  local cpu0 cpua0 wait0; cpu0=$(nodes_cpu_s); cpua0=$(nodes_cpu_s "${PIDS[0]}"); wait0=$(nodes_wait_s)
  "${FIO_PIN[@]}" fio --name="$name" --ioengine=nbd --uri="nbd+unix:///$export?socket=$SOCK" \
      --rw=randwrite --bs=4k --iodepth="$qd" --numjobs=1 --time_based --runtime="$RUNTIME" \
      --size="$SIZE_BYTES" --randrepeat=0 --output-format=json >"$OUT/$name.json"
  echo "$cpu0 $(nodes_cpu_s)" | awk '{printf "%.3f\n", $2 - $1}' >"$OUT/$name.cpu"
  echo "$cpua0 $(nodes_cpu_s "${PIDS[0]}")" | awk '{printf "%.3f\n", $2 - $1}' >"$OUT/$name.cpua"
  echo "$wait0 $(nodes_wait_s)" | awk '{printf "%.3f\n", $2 - $1}' >"$OUT/$name.sched"
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

# --- Part `resync`: issue 13's targets for resync and rebuild ------------------------------
# Nodes: a (core A_CPU) runs the nexus over its local replica "vol" and hosts the plain volume
# "raw", both in its pool file; b (core B_CPU) hosts replica "vol" in a pool file, so a
# restart keeps its data; c (core B_CPU), started for the rebuilds, a fresh replica. Every
# volume is filled first. The load is LOAD_IOPS (300) random 4 KiB writes a second with a
# flush every LOAD_FLUSH_EVERY (50) writes, one fio nbd job at QD 1, so a write's latency is
# the stall the client sees. Figures, all from the same run:
#   baseline: the load for RUNTIME s on "raw" and on the nexus with both replicas in sync:
#     the longest write and flush;
#   resync: under the load, b is killed (SIGKILL) for OUTAGE (3) s and restarted. From the
#     fault until b is back in sync: bytes the client wrote (a's export counter, the bytes b
#     missed), bytes the resync copied (ratio: copied / missed), time from restart to in-sync,
#     the longest write and flush of the job, and the nexus's write_wait_max_us when reported;
#   rebuild under load: `nexus add c` with the load running: time, bytes copied, the longest
#     write and flush, and whether the sampled progress ever went back or its total changed;
#   quiet rebuild: c removed and added again with no load, QUIET_REBUILDS (3) times; the
#     median copy rate (a's log lines "resync finished": copied_bytes / seconds) against
#     fio's sequential read (1 MiB, QD 8) of the source disk in the same run: a file in
#     WORKDIR with io_uring and O_DIRECT, and "raw" (a volume in the same pool as the source)
#     through NBD. For the diagnosis
#     (docs/replication.md, "Rebuild speed"): per second of the rebuild, the CPU seconds a and
#     c ran and waited for a CPU (/proc/PID/task/*/schedstat); and fio copying in the
#     rebuild's own pattern, a sequential read of one file and a sequential write of another
#     on the same disk at once (128 KiB, QD 8 each, O_DIRECT), since here source and target
#     share that disk.
LOAD_IOPS=${LOAD_IOPS:-300}
LOAD_FLUSH_EVERY=${LOAD_FLUSH_EVERY:-50}
OUTAGE=${OUTAGE:-3}
SYNC_TIMEOUT=${SYNC_TIMEOUT:-300}
QUIET_REBUILDS=${QUIET_REBUILDS:-3}
C_ADMIN=127.0.0.1:$((PORT_BASE + 4))
C_REPLICA=127.0.0.1:$((PORT_BASE + 5))

# load_start NAME EXPORT: the paced load through NBD in the background (LOAD_PID); it runs
# until load_stop (fio writes its report when interrupted).
load_start() {
  fio --name="$1" --ioengine=nbd --uri="nbd+unix:///$2?socket=$SOCK" --rw=randwrite --bs=4k \
      --iodepth=1 --rate_iops="$LOAD_IOPS" --fsync="$LOAD_FLUSH_EVERY" --numjobs=1 \
      --time_based --runtime=3600 --size="$SIZE_BYTES" --randrepeat=0 \
      --output-format=json >"$OUT/$1.json" &
  LOAD_PID=$!
}
load_stop() { kill -INT "$LOAD_PID"; wait "$LOAD_PID" || true; }

now() { date +%s.%N; }
# minus A B: A - B, for JSON.
minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

# sched PID: "RUN, WAIT" (for a JSON list), the seconds all the process's threads have run on
# a CPU and waited for one.
sched() { cat /proc/"$1"/task/*/schedstat | awk '{ r += $1; w += $2 } END { printf "%.3f, %.3f", r / 1e9, w / 1e9 }'; }

# vol_written: bytes clients have written to a's export "vol" (its metrics counter).
vol_written() {
  local addr
  addr=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' "$WORKDIR/a.out")
  python3 - "$addr" <<'PY'
import sys, urllib.request
page = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=30).read().decode()
print(next(l.split()[-1] for l in page.splitlines()
           if l.startswith('cairn_volume_bytes_total{volume="vol",dir="write"}')))
PY
}

# wait_sync REPLICAS FILE: polls `nexus show` every 0.1 s until REPLICAS replicas are in sync
# with no resync running (failing after SYNC_TIMEOUT s); writes to FILE the seconds waited,
# the final view and what the progress samples showed.
wait_sync() {
  python3 - "$CTL" "$A_ADMIN" "$1" "$SYNC_TIMEOUT" "$2" <<'PY'
import json, subprocess, sys, time
ctl, addr, want, timeout, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
start, samples = time.monotonic(), []
while True:
    v = json.loads(subprocess.check_output([ctl, "node", "--addr", addr, "--json", "nexus", "show", "vol"]))
    r = v.get("resync")
    if r:
        samples.append((r.get("done_bytes", 0), r.get("total_bytes", 0), r.get("progress", 0.0)))
    reps = v.get("replicas", [])
    if not r and len(reps) == want and all(x.get("state") == "in-sync" for x in reps):
        break
    if time.monotonic() - start > timeout:
        sys.exit(f"replication bench: not in sync after {timeout} s: {json.dumps(v)}")
    time.sleep(0.1)
back = sum(1 for a, b in zip(samples, samples[1:]) if b[2] < a[2] or b[0] < a[0])
totals = sorted({t for _, t, _ in samples})
json.dump({"seconds": time.monotonic() - start, "view": v, "samples": len(samples),
           "progress_back": back, "totals": totals}, open(out, "w"))
PY
}

# seq_read NAME ARGS...: fio's sequential read, 1 MiB QD 8, of the whole size.
seq_read() {
  local name=$1; shift
  fio --name="$name" "$@" --rw=read --bs=1M --iodepth=8 --size="$SIZE_BYTES" \
      --output-format=json >"$OUT/$name.json"
}

run_resync() {
  rm -rf "$WORKDIR"; mkdir -p "$WORKDIR"
  node a --cores "$A_CPU" --data-dir "$WORKDIR/a" --nbd-socket "$SOCK" --admin-listen "$A_ADMIN" \
       --replica-listen off --replica-volume "vol:$SIZE_BYTES" --volume "raw:$SIZE_BYTES" \
       --pool0-size "$POOL_BYTES"
  local b_args=(--cores "$B_CPU" --data-dir "$WORKDIR/b" --admin-listen "$B_ADMIN"
                --replica-listen "$B_REPLICA" --replica-volume "vol:$SIZE_BYTES" --pool0-size "$POOL_BYTES")
  node b "${b_args[@]}"
  nexus_up 2
  for e in vol raw; do
    fio --name=fill --ioengine=nbd --uri="nbd+unix:///$e?socket=$SOCK" --rw=write --bs=1M \
        --iodepth=8 --size="$SIZE_BYTES" --output-format=terse >/dev/null
  done
  fio --name=fill --ioengine=io_uring --direct=1 --filename="$WORKDIR/disk.img" --rw=write \
      --bs=1M --iodepth=8 --size="$SIZE_BYTES" --output-format=terse >/dev/null
  seq_read resync-seqread-disk --ioengine=io_uring --direct=1 --filename="$WORKDIR/disk.img"
  seq_read resync-seqread-raw --ioengine=nbd --uri="nbd+unix:///raw?socket=$SOCK"
  fio --ioengine=io_uring --direct=1 --bs=128k --iodepth=8 --size="$SIZE_BYTES" \
      --output-format=json --name=read --rw=read --filename="$WORKDIR/disk.img" \
      --name=write --rw=write --filename="$WORKDIR/disk2.img" >"$OUT/resync-copy-disk.json"

  load_start resync-base-raw raw; sleep "$RUNTIME"; load_stop
  load_start resync-base-nexus2 vol; sleep "$RUNTIME"; load_stop

  local t_fault w_fault t_restart w_sync
  load_start resync-outage vol
  sleep 2
  w_fault=$(vol_written); t_fault=$(now)
  kill -KILL "${PIDS[1]}"; wait "${PIDS[1]}" 2>/dev/null || true; unset 'PIDS[1]'
  sleep "$OUTAGE"
  node b "${b_args[@]}"
  t_restart=$(now)
  wait_sync 2 "$OUT/resync-outage-sync.json"
  w_sync=$(vol_written)
  load_stop
  echo "{\"fault_to_restart_s\": $(minus "$t_restart" "$t_fault"), \"missed_bytes\": $((w_sync - w_fault))}" \
    >"$OUT/resync-outage-client.json"

  node c --cores "$B_CPU" --data-dir "$WORKDIR/c" --admin-listen "$C_ADMIN" \
       --replica-listen "$C_REPLICA" --replica-volume "vol:$SIZE_BYTES" --pool0-size "$POOL_BYTES"
  load_start resync-rebuild-load vol
  sleep 2
  "$CTL" node --addr "$A_ADMIN" nexus add vol "$C_REPLICA" >/dev/null
  wait_sync 3 "$OUT/resync-rebuild-load-sync.json"
  load_stop

  local a_pid=${PIDS[0]} c_pid=${PIDS[-1]} t0 a0 c0
  t0=$(now); a0=$(sched "$a_pid"); c0=$(sched "$c_pid")
  for _ in $(seq "$QUIET_REBUILDS"); do
    "$CTL" node --addr "$A_ADMIN" nexus remove vol "$C_REPLICA" >/dev/null
    "$CTL" node --addr "$A_ADMIN" nexus add vol "$C_REPLICA" >/dev/null
    wait_sync 3 "$OUT/resync-rebuild-quiet-sync.json"
  done
  echo "{\"wall_s\": $(minus "$(now)" "$t0"), \"a\": [$a0], \"a_end\": [$(sched "$a_pid")], \
        \"c\": [$c0], \"c_end\": [$(sched "$c_pid")]}" \
    >"$OUT/resync-rebuild-quiet-cpu.json"
  grep 'resync finished' "$WORKDIR/a.log" | tail -"$QUIET_REBUILDS" >"$OUT/resync-rebuild-quiet.log"
  for p in "${PIDS[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
  PIDS=()
}

for part in $PARTS; do
  echo "== $part"
  if [ "$part" = resync ]; then run_resync; else run_part "$part"; fi
done

: >"$OUT/summary.txt"
ROUND_PARTS=$(printf '%s\n' $PARTS | grep -vx resync | tr '\n' ' ' || true)
if [ -n "$ROUND_PARTS" ]; then
python3 - "$OUT" "$ROUNDS" "$ROUND_PARTS" <<'PY' | tee "$OUT/summary.txt"
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
def cpu_per_io(name, kind="cpu"):
    text = open(f"{out}/{name}.json").read()
    ios = json.loads(text[text.index("{"):])["jobs"][0]["write"]["total_ios"]
    return float(open(f"{out}/{name}.{kind}").read()) / max(ios, 1) * 1e6
# The client's own CPU per I/O, from fio's usr_cpu and sys_cpu (percent of the job's runtime).
def client_cpu_per_io(name):
    text = open(f"{out}/{name}.json").read()
    j = json.loads(text[text.index("{"):])["jobs"][0]
    busy_s = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1e3
    return busy_s / max(j["write"]["total_ios"], 1) * 1e6
for part in parts:
    for qd in (32, 1):
        if not os.path.exists(f"{out}/{part}-nexus1-qd{qd}-r1.cpu"):
            continue
        c1, c2 = (statistics.median(cpu_per_io(f"{part}-nexus{n}-qd{qd}-r{r}") for r in range(1, rounds + 1))
                  for n in (1, 2))
        print(f"{part:5} {'node CPU us per I/O, QD' + str(qd):30} {c1:>10.2f} {c2:>10.2f} {c2 / c1:>8.3f}x")
        if os.path.exists(f"{out}/{part}-nexus1-qd{qd}-r1.cpua"):
            a1, a2 = (statistics.median(cpu_per_io(f"{part}-nexus{n}-qd{qd}-r{r}", "cpua") for r in range(1, rounds + 1))
                      for n in (1, 2))
            print(f"{part:5} {'  attach node alone, QD' + str(qd):30} {a1:>10.2f} {a2:>10.2f} {a2 / a1:>8.3f}x")
        f1, f2 = (statistics.median(client_cpu_per_io(f"{part}-nexus{n}-qd{qd}-r{r}") for r in range(1, rounds + 1))
                  for n in (1, 2))
        print(f"{part:5} {'client (fio) CPU us per I/O, QD' + str(qd):30} {f1:>10.2f} {f2:>10.2f} {f2 / f1:>8.3f}x")
# Waiting for a CPU: ms per second of the job that the nodes' threads were runnable but not
# running; and the share of I/Os that took 1 ms or more (in %).
def fio_job_of(name):
    text = open(f"{out}/{name}.json").read()
    return json.loads(text[text.index("{"):])["jobs"][0]
def wait_ms_per_s(name):
    return float(open(f"{out}/{name}.sched").read()) / (fio_job_of(name)["job_runtime"] / 1e3) * 1e3
def slow_pct(name):
    # fio's latency_ms buckets start above its last µs bucket (1000 µs).
    return sum(fio_job_of(name)["latency_ms"].values())
for part in parts:
    for qd in (32, 1):
        if not os.path.exists(f"{out}/{part}-nexus1-qd{qd}-r1.sched"):
            continue
        w1, w2 = (statistics.median(wait_ms_per_s(f"{part}-nexus{n}-qd{qd}-r{r}") for r in range(1, rounds + 1))
                  for n in (1, 2))
        s1, s2 = (statistics.median(slow_pct(f"{part}-nexus{n}-qd{qd}-r{r}") for r in range(1, rounds + 1))
                  for n in (1, 2))
        print(f"{part:5} {'node run-queue wait ms/s, QD' + str(qd):30} {w1:>10.1f} {w2:>10.1f}")
        print(f"{part:5} {'I/Os >= 1 ms %, QD' + str(qd):30} {s1:>10.3f} {s2:>10.3f}")
PY
fi
if [[ " $PARTS " == *" resync "* ]]; then
python3 - "$OUT" "$SIZE_BYTES" "$LOAD_IOPS" "$LOAD_FLUSH_EVERY" "$OUTAGE" "$B_REPLICA" "$C_REPLICA" \
    <<'PY' | tee -a "$OUT/summary.txt"
import json, re, statistics, sys
out, size, iops, every, outage, b, c = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
def load(name):
    text = open(f"{out}/{name}.json").read()
    return json.loads(text[text.index("{"):])
def stall_ms(name):
    # The longest write and the longest flush of the load job, in ms.
    j = load(name)["jobs"][0]
    return j["write"]["lat_ns"]["max"] / 1e6, j.get("sync", {}).get("lat_ns", {}).get("max", 0) / 1e6
def read_mib_s(name):
    return load(name)["jobs"][0]["read"]["bw_bytes"] / 2**20
def target(sync, address):
    return next(r for r in sync["view"]["replicas"] if r["address"] == address)
def wait_ms(sync, address):
    w = target(sync, address).get("write_wait_max_us")
    return "not reported" if w is None else f"{w / 1000:.1f} ms"
outage_sync, client = load("resync-outage-sync"), load("resync-outage-client")
rebuild_sync, quiet_sync = load("resync-rebuild-load-sync"), load("resync-rebuild-quiet-sync")
copied, missed = target(outage_sync, b).get("copied_bytes", 0), client["missed_bytes"]
field = lambda line, k: float(re.search(rf"{k}=([0-9.e+-]+)", line).group(1))
quiet = [field(l, "copied_bytes") / 2**20 / field(l, "seconds")
         for l in open(f"{out}/resync-rebuild-quiet.log").read().splitlines()]
quiet_mib_s = statistics.median(quiet)
disk, raw = read_mib_s("resync-seqread-disk"), read_mib_s("resync-seqread-raw")
copy = load("resync-copy-disk")["jobs"]
copy_read, copy_write = (copy[0]["read"]["bw_bytes"] / 2**20, copy[1]["write"]["bw_bytes"] / 2**20)
cpu = load("resync-rebuild-quiet-cpu")
per_s = lambda n, i: (cpu[f"{n}_end"][i] - cpu[n][i]) / cpu["wall_s"]
rows = {
    "load": f"{iops} random 4 KiB writes/s, a flush every {every}, QD 1 (fio nbd)",
    "baseline raw: longest write / flush ms": "%.1f / %.1f" % stall_ms("resync-base-raw"),
    "baseline nexus2: longest write / flush ms": "%.1f / %.1f" % stall_ms("resync-base-nexus2"),
    f"resync ({outage} s outage): longest write / flush ms": "%.1f / %.1f" % stall_ms("resync-outage"),
    "resync: nexus write_wait_max": wait_ms(outage_sync, b),
    "resync: restart to in-sync s": f"{outage_sync['seconds']:.2f}",
    "resync: bytes missed (written fault..in-sync)": f"{missed}",
    "resync: bytes copied": f"{copied}",
    "resync: copied / missed": f"{copied / max(missed, 1):.2f}x",
    "rebuild under load: longest write / flush ms": "%.1f / %.1f" % stall_ms("resync-rebuild-load"),
    "rebuild under load: nexus write_wait_max": wait_ms(rebuild_sync, c),
    "rebuild under load: s, bytes copied": f"{rebuild_sync['seconds']:.2f}, {target(rebuild_sync, c).get('copied_bytes', 0)}",
    "rebuild under load: progress back / totals seen": f"{rebuild_sync['progress_back']} / {len(rebuild_sync['totals'])}",
    "quiet rebuild MiB/s, median (each)": f"{quiet_mib_s:.1f} ({', '.join(f'{q:.0f}' for q in quiet)})",
    "seq read MiB/s: disk (io_uring O_DIRECT) / raw (NBD)": f"{disk:.1f} / {raw:.1f}",
    "quiet rebuild vs disk seq read": f"{quiet_mib_s / disk:.3f}x",
    "quiet rebuild vs raw seq read": f"{quiet_mib_s / raw:.3f}x",
    "disk copy-like, read / write at once MiB/s": f"{copy_read:.1f} / {copy_write:.1f}",
    "quiet rebuild vs copy-like read": f"{quiet_mib_s / copy_read:.3f}x",
    "quiet rebuild: CPU s/s ran, a / c": f"{per_s('a', 0):.2f} / {per_s('c', 0):.2f}",
    "quiet rebuild: CPU s/s waited for a CPU, a / c": f"{per_s('a', 1):.2f} / {per_s('c', 1):.2f}",
}
json.dump(rows, open(f"{out}/resync.json", "w"), indent=1)
print(f"resync part, volume {size} B")
for k, v in rows.items():
    print(f"  {k:52} {v}")
PY
fi
echo "results: $OUT"

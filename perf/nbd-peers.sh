#!/usr/bin/env bash
# Peer benchmark: cairn-node's NBD server against qemu-nbd and nbdkit, with one client and one
# workload for all of them: fio's nbd engine, 4 KiB random reads and random writes, QD 32,
# 1 job, time based, over a unix socket. Prints one table and keeps every fio JSON.
#
#   perf/nbd-peers.sh                      # SIZE=4G RUNTIME=10
#   SIZE=1G RUNTIME=3 perf/nbd-peers.sh    # smoke
#
# What runs, in order:
#   disk:  cairn-node serving a thin volume in a pool file; qemu-nbd (-f raw --cache=none
#          --aio=io_uring) serving a raw file; nbdkit's file plugin serving the same raw file.
#          All files are SIZE bytes (the pool a little more, for metadata) in WORKDIR, so on one
#          filesystem. The raw file is filled with random data by fio first, and the volume is
#          filled from it with nbdcopy through NBD, so every cluster is allocated and reads
#          hit the disk, not holes. The page cache is dropped before each disk server starts.
#   ram:   cairn-node --malloc against `nbdkit memory`, both prefilled by one sequential fio
#          write through NBD (a never-written nbdkit memory page reads as a hole, for free);
#          `nbdkit null` is the client's own ceiling: what fio's nbd engine reaches when the
#          server does nothing.
#
# Fairness: every server gets the same one CPU (SERVER_CPU, default 1) and fio gets another
# (FIO_CPU, default 0), so client and server never steal each other's cycles and no server
# has more cores than another. cairn-node is given `--cores SERVER_CPU`; qemu-nbd and nbdkit
# are started under `taskset -c SERVER_CPU`, which confines all their threads (and io_uring
# workers, which inherit the mask). cairn-node's default idle policy (adaptive) spins only
# when it expects work within a few µs and otherwise sleeps in the kernel, as the others do.
# CPU: the table gives each server's CPU per I/O (all its threads, /proc/PID/stat, from the
# end of fio's 1 s ramp to the end of the run, over the I/Os fio counted) and its ratio to
# qemu-nbd's on the same medium and workload.
# nbdkit's file plugin has no O_DIRECT; it runs with cache=none (it drops pages it has
# read or written) and fadvise=random, its documented way to keep out of the page cache.
#
# Environment: SIZE (4G), RUNTIME seconds per run (10), WORKDIR (target/nbd-peers, removed at
# the end unless KEEP=1), OUT (perf/results/nbd-peers-DATE), CAIRN_NODE (built if unset),
# SERVER_CPU (1), FIO_CPU (0), PARTS ("disk ram"), CAIRN_IDLE (adaptive: cairn-node's
# default; `sleep` spins 50 µs after the last work, then sleeps; `poll` keeps the core spinning).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-4G}
RUNTIME=${RUNTIME:-10}
WORKDIR=${WORKDIR:-$PWD/target/nbd-peers}
OUT=${OUT:-perf/results/nbd-peers-$(date +%Y-%m-%d)}
SERVER_CPU=${SERVER_CPU:-1}
FIO_CPU=${FIO_CPU:-0}
PARTS=${PARTS:-disk ram}
CAIRN_IDLE=${CAIRN_IDLE:-adaptive}
RAMP_S=1
SOCK=$WORKDIR/nbd.sock
# cairn-node also listens on TCP and for admin and metrics; keep clear of a real node's ports.
PORT_BASE=${PORT_BASE:-20809}

for t in fio nbdinfo nbdcopy qemu-nbd nbdkit taskset python3; do
  command -v "$t" >/dev/null || { echo "nbd-peers: $t not found (apt-get install fio libnbd-bin qemu-utils nbdkit)" >&2; exit 1; }
done
if [ -z "${CAIRN_NODE:-}" ]; then
  cargo build --release -q -p cairn-node
  CAIRN_NODE=target/release/cairn-node
fi

bytes() { numfmt --from=iec "${1%B}"; }
SIZE_BYTES=$(bytes "$SIZE")
POOL_BYTES=$((SIZE_BYTES + SIZE_BYTES / 8 + 256 * 1024 * 1024))

mkdir -p "$OUT" "$WORKDIR"
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORKDIR"
}
trap cleanup EXIT

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

# start NAME CMD...: runs a server in the background and waits until nbdinfo gets an answer.
start() {
  local name=$1 uri=$2; shift 2
  rm -f "$SOCK"
  "$@" >"$WORKDIR/$name.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    if nbdinfo --size "$uri" >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "nbd-peers: $name did not answer on $uri" >&2
  cat "$WORKDIR/$name.log" >&2
  exit 1
}

stop() {
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || echo "nbd-peers: server exited with $? after SIGTERM" >&2
  SERVER_PID=
}

# proc_cpu_s PID: CPU-seconds (user + system, all threads) the process has used so far.
proc_cpu_s() {
  echo "$(awk '{print $14 + $15}' "/proc/$1/stat") $(getconf CLK_TCK)" | awk '{printf "%.3f\n", $1 / $2}'
}

# bench SERVER MEDIUM RW URI: one fio run, JSON into OUT; the server's CPU-seconds from the end
# of fio's ramp to the end of the run into the .cpu file beside it.
bench() {
  local server=$1 medium=$2 rw=$3 uri=$4
  local json="$OUT/$medium-$server-$rw.json"
  echo "  $server $rw (${RUNTIME}s)" >&2
  (sleep "$RAMP_S"; proc_cpu_s "$SERVER_PID" >"${json%.json}.cpu0") &
  local ramp=$!
  taskset -c "$FIO_CPU" fio --name="$server-$rw" --ioengine=nbd --uri="$uri" \
    --rw="$rw" --bs=4k --iodepth=32 --numjobs=1 --size="$SIZE_BYTES" \
    --time_based --runtime="$RUNTIME" --ramp_time="$RAMP_S" --norandommap --randrepeat=0 \
    --output-format=json --output="$json"
  wait "$ramp"
  echo "$(cat "${json%.json}.cpu0") $(proc_cpu_s "$SERVER_PID")" | awk '{printf "%.3f\n", $2 - $1}' >"${json%.json}.cpu"
  rm -f "${json%.json}.cpu0"
  echo "$medium $server $rw $json" >>"$OUT/runs.txt"
}

fill_via_nbd() {
  taskset -c "$FIO_CPU" fio --name=fill --ioengine=nbd --uri="$1" --rw=write --bs=1M \
    --iodepth=8 --size="$SIZE_BYTES" --output-format=terse >/dev/null
}

: >"$OUT/runs.txt"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "size: $SIZE runtime_s: $RUNTIME server_cpu: $SERVER_CPU fio_cpu: $FIO_CPU"
  echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
  echo "fs: $(df -hT "$WORKDIR" | tail -1)"
  fio --version; qemu-nbd --version | sed -n 1p; nbdkit --version; nbdinfo --version | sed -n 1p
  echo "cairn-node: $(git rev-parse --short HEAD) idle=$CAIRN_IDLE"
  echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every row)"
} >"$OUT/env.txt"

URI="nbd+unix:///bench?socket=$SOCK"
cairn_args=(--nbd-listen "127.0.0.1:$PORT_BASE" --nbd-socket "$SOCK"
  --admin-listen "127.0.0.1:$((PORT_BASE + 1))" --metrics-listen "127.0.0.1:$((PORT_BASE + 2))"
  --cores "$SERVER_CPU" --idle "$CAIRN_IDLE")

if [[ " $PARTS " == *" disk "* ]]; then
  echo "disk: filling $WORKDIR/raw.img ($SIZE) with random data" >&2
  fio --name=fill --filename="$WORKDIR/raw.img" --rw=write --bs=1M --size="$SIZE_BYTES" \
    --ioengine=libaio --direct=1 --iodepth=8 --output-format=terse >/dev/null

  drop_caches
  start cairn "$URI" "$CAIRN_NODE" --data-dir "$WORKDIR/cairn" --pool0-size "$POOL_BYTES" \
    --volume "bench:$SIZE_BYTES" "${cairn_args[@]}"
  echo "  cairn: filling the volume with nbdcopy" >&2
  nbdcopy --flush "$WORKDIR/raw.img" "$URI"
  for rw in randread randwrite; do bench cairn disk $rw "$URI"; done
  stop
  rm -rf "$WORKDIR/cairn"

  drop_caches
  start qemu-nbd "$URI" taskset -c "$SERVER_CPU" qemu-nbd -f raw --cache=none --aio=io_uring \
    -x bench -k "$SOCK" -e 4 -t "$WORKDIR/raw.img"
  for rw in randread randwrite; do bench qemu-nbd disk $rw "$URI"; done
  stop

  drop_caches
  start nbdkit "$URI" taskset -c "$SERVER_CPU" nbdkit -f -U "$SOCK" file "$WORKDIR/raw.img" \
    cache=none fadvise=random
  for rw in randread randwrite; do bench nbdkit disk $rw "$URI"; done
  stop
  rm -f "$WORKDIR/raw.img"
fi

if [[ " $PARTS " == *" ram "* ]]; then
  URI_RAM="nbd+unix:///ram?socket=$SOCK"
  mkdir -p "$WORKDIR/cairn-ram"
  start cairn "$URI_RAM" "$CAIRN_NODE" --data-dir "$WORKDIR/cairn-ram" --malloc "ram:$SIZE_BYTES" "${cairn_args[@]}"
  fill_via_nbd "$URI_RAM"
  for rw in randread randwrite; do bench cairn ram $rw "$URI_RAM"; done
  stop
  rm -rf "$WORKDIR/cairn-ram"

  start nbdkit-memory "$URI" taskset -c "$SERVER_CPU" nbdkit -f -U "$SOCK" memory "$SIZE_BYTES"
  fill_via_nbd "$URI"
  for rw in randread randwrite; do bench nbdkit-memory ram $rw "$URI"; done
  stop

  start nbdkit-null "$URI" taskset -c "$SERVER_CPU" nbdkit -f -U "$SOCK" null "$SIZE_BYTES"
  for rw in randread randwrite; do bench nbdkit-null ram $rw "$URI"; done
  stop
fi

echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
python3 - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, sys, os
out = sys.argv[1]
rows = []
for line in open(os.path.join(out, "runs.txt")):
    medium, server, rw, path = line.split()
    job = json.load(open(path))["jobs"][0]
    side = job["read" if rw == "randread" else "write"]
    p99_us = side["clat_ns"]["percentile"]["99.000000"] / 1000
    cpu_s = float(open(path[: -len(".json")] + ".cpu").read())
    cpu_us = cpu_s / max(side["total_ios"], 1) * 1e6
    rows.append((medium, server, rw, side["iops"], p99_us, cpu_us))
cairn = {(m, rw): iops for m, s, rw, iops, _, _ in rows if s == "cairn"}
qemu = {(m, rw): cpu for m, s, rw, _, _, cpu in rows if s == "qemu-nbd"}
print("| medium | server | workload | IOPS | p99 (µs) | IOPS / cairn | CPU µs per I/O | CPU / qemu-nbd |")
print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
for m, s, rw, iops, p99, cpu in rows:
    base = cairn.get((m, rw))
    ratio = f"{iops / base:.3f}" if base else "-"
    q = qemu.get((m, rw))
    cpu_ratio = f"{cpu / q:.3f}" if q else "-"
    print(f"| {m} | {s} | {rw} | {iops:,.0f} | {p99:,.0f} | {ratio} | {cpu:.2f} | {cpu_ratio} |")
null = {rw: iops for m, s, rw, iops, _, _ in rows if s == "nbdkit-null"}
if ("ram", "randread") in cairn and "randread" in null:
    r = cairn[("ram", "randread")] / null["randread"]
    print(f"\ncairn --malloc randread reaches {r:.3f} of nbdkit null (fio's nbd engine ceiling here)")
EOF
echo "results: $OUT" >&2

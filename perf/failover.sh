#!/usr/bin/env bash
# Failover time (docs/control.md, "Failover"): from `kill -9` of a volume's attach node to the
# first acknowledged write on the nexus the leader opens elsewhere.
#
#   perf/failover.sh                 # embedded store, 10 rounds
#   RUNS=3 perf/failover.sh
#   STORE=etcd perf/failover.sh      # an etcd of its own (etcd on PATH)
#
# Set-up: cairn-control and three nodes (node-a, node-b, node-c, one zone each) on loopback.
# Each round creates a 3-replica volume, attaches it to node-a, writes and flushes through NBD,
# then kills node-a (`kill -9`) and times, with libnbd (/usr/bin/python3, `import nbd`), until a
# write and flush through the volume's new NBD URI are acknowledged; node-a is restarted before
# the next round. Prints each round and the median and max. Target: 5 s or less (a 2 s lease,
# the 250 ms monitor, a 500 ms reconcile pass, the nexus create).
#
# Environment: RUNS (10), STORE (embedded; etcd), SIZE (8M, each round's volume),
# WORKDIR (target/failover, removed at the start), PORT_BASE (23809), NODE and CTL and
# CONTROL (default target/release/…, built first).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-10}
STORE=${STORE:-embedded}
SIZE=${SIZE:-8M}
WORKDIR=${WORKDIR:-$PWD/target/failover}
PORT_BASE=${PORT_BASE:-23809}
PY=/usr/bin/python3

"$PY" -c 'import nbd' 2>/dev/null || { echo "failover: $PY cannot import nbd (python3-libnbd)" >&2; exit 1; }
if [ -z "${NODE:-}" ]; then
  cargo build --release -q -p cairn-node -p cairn-control
fi
NODE=${NODE:-target/release/cairn-node}
CTL=${CTL:-target/release/cairnctl}
CONTROL=${CONTROL:-target/release/cairn-control}
URL=http://127.0.0.1:$PORT_BASE

rm -rf "$WORKDIR"
mkdir -p "$WORKDIR"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

store_args=()
case $STORE in
  embedded) ;;
  etcd)
    command -v etcd >/dev/null || { echo "failover: etcd not found" >&2; exit 1; }
    etcd --name=perf --data-dir="$WORKDIR/etcd" \
      --listen-client-urls="http://127.0.0.1:$((PORT_BASE + 50))" \
      --advertise-client-urls="http://127.0.0.1:$((PORT_BASE + 50))" \
      --listen-peer-urls="http://127.0.0.1:$((PORT_BASE + 51))" \
      --initial-advertise-peer-urls="http://127.0.0.1:$((PORT_BASE + 51))" \
      --initial-cluster="perf=http://127.0.0.1:$((PORT_BASE + 51))" \
      >"$WORKDIR/etcd.log" 2>&1 &
    pids+=($!)
    store_args=(--etcd "http://127.0.0.1:$((PORT_BASE + 50))")
    for _ in $(seq 1 600); do
      curl -sf "http://127.0.0.1:$((PORT_BASE + 50))/health" | grep -q true && break
      sleep 0.1
    done
    ;;
  *) echo "failover: STORE is embedded or etcd, not $STORE" >&2; exit 1 ;;
esac

"$CONTROL" --data-dir "$WORKDIR/control" --listen "127.0.0.1:$PORT_BASE" "${store_args[@]}" \
  >"$WORKDIR/control.out" 2>"$WORKDIR/control.log" &
pids+=($!)

declare -A node_pid
# start_node I: node I (0 node-a, 1 node-b, 2 node-c) on its fixed ports.
start_node() {
  local i=$1 id base
  id=node-$(printf "\\x$(printf %x $((97 + i)))")
  base=$((PORT_BASE + 10 * (i + 1)))
  "$NODE" --data-dir "$WORKDIR/$id" --pool0-size 256M \
    --nbd-listen "127.0.0.1:$base" --admin-listen "127.0.0.1:$((base + 1))" \
    --metrics-listen "127.0.0.1:$((base + 2))" --replica-listen "127.0.0.1:$((base + 3))" \
    --control "$URL" --node-id "$id" --zone "z$i" >>"$WORKDIR/$id.out" 2>>"$WORKDIR/$id.log" &
  node_pid[$i]=$!
  pids+=($!)
}
mkdir -p "$WORKDIR"/node-{a,b,c}
for i in 0 1 2; do start_node "$i"; done

# The Python side: waits for states through the REST API and does the timed NBD writes.
cat >"$WORKDIR/failover.py" <<'EOF'
import json, sys, time, urllib.request, nbd

url, cmd, vol = sys.argv[1], sys.argv[2], sys.argv[3]
DEADLINE_S = 120

def get(path):
    try:
        with urllib.request.urlopen(url + path, timeout=5) as r:
            return json.load(r)
    except Exception:
        return None

def until(what, check):
    start = time.monotonic()
    while time.monotonic() - start < DEADLINE_S:
        v = check()
        if v:
            return v
        time.sleep(0.02)
    sys.exit(f"failover: timed out waiting for {what}")

def attached(avoid=None):
    v = get(f"/v1/volumes/{vol}")
    a = (v or {}).get("attached") or {}
    if a.get("nbd_uri") and a.get("node") != avoid:
        return a["node"], a["nbd_uri"]
    return None

def write(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\xa5" * 4096, 0)
    h.flush()
    h.shutdown()

if cmd == "nodes-up":
    until("three nodes up", lambda: (lambda n: n and sum(x["state"] == "up" for x in n) == 3)(get("/v1/nodes")))
elif cmd == "attached":
    node, uri = until("the nexus on node-a", lambda: attached())
    write(uri)
    print(node)
elif cmd == "failover":
    # argv[4]: the attach node's pid, killed here so the clock starts at the kill.
    import os, signal
    old = sys.argv[5]
    os.kill(int(sys.argv[4]), signal.SIGKILL)
    t0 = time.monotonic()
    def first_write():
        a = attached(avoid=old)
        if not a:
            return None
        try:
            write(a[1])
            return a
        except nbd.Error:
            return None
    node, _ = until("a write on the new nexus", first_write)
    print(f"{time.monotonic() - t0:.3f} {node}")
EOF

"$PY" "$WORKDIR/failover.py" "$URL" nodes-up -
times=()
for r in $(seq 1 "$RUNS"); do
  vol=f$r
  "$CTL" volume create "$vol" --size "$SIZE" --replicas 3 --control "$URL" >/dev/null
  "$CTL" volume attach "$vol" --node node-a --control "$URL" >/dev/null
  "$PY" "$WORKDIR/failover.py" "$URL" attached "$vol" >/dev/null
  read -r secs to < <("$PY" "$WORKDIR/failover.py" "$URL" failover "$vol" "${node_pid[0]}" node-a)
  wait "${node_pid[0]}" 2>/dev/null || true
  echo "round $r: ${secs} s from kill -9 of node-a to the first write on $to"
  times+=("$secs")
  start_node 0
  "$PY" "$WORKDIR/failover.py" "$URL" nodes-up -
done
printf '%s\n' "${times[@]}" | sort -n | awk -v store="$STORE" '
  { t[NR] = $1 }
  END {
    median = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
    printf "failover (%s store, %d rounds): median %.3f s, max %.3f s (target <= 5 s)\n", store, NR, median, t[NR]
  }'

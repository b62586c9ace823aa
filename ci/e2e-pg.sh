#!/usr/bin/env bash
# The end-to-end story (docs/csi.md, "End to end"): PostgreSQL on a 3-replica volume survives
# the loss of its node, with nobody doing anything but what Kubernetes does.
#
# Three cairn-node processes, each in its own network namespace with its own address on a
# bridge, and cairn-control with etcd on the host side of the bridge. Every volume call is a
# CSI call (`cairnctl csi`), the ones kubelet and the sidecars make: CreateVolume (3
# replicas), ControllerPublish, NodeStage and NodePublish on node a. PostgreSQL (initdb -k,
# data checksums on) runs on the published mount and pgbench writes through it; the client
# side logs every committed transaction. Then node a dies: kill -9 of its cairn-node, its
# nbdfuse and PostgreSQL, and its link goes down. As for a rescheduled pod: ControllerPublish
# to node b (refused while a's lease lives, accepted once it expired), NodeStage, NodePublish,
# PostgreSQL started there. Checks: PostgreSQL recovers; pgbench_history holds, for each
# pgbench client, at least every commit that client saw acknowledged; after a clean stop `pg_checksums --check` passes. Prints the outage,
# from the kill until PostgreSQL on b accepts a write. Then node a comes back (link up, its
# cairn-node restarted): kubelet's unpublish and unstage of the dead pod's mount run on a, and
# the volume has three in-sync replicas again.
#
# Needs root (namespaces, loop devices, mounts), etcd, nbdfuse, PostgreSQL. Under CI a missing
# one fails the run; elsewhere the script skips with the reason. RUNS=N repeats the kill
# scenario (perf/failover-pg.sh takes the median of the outages); OUTAGE_FILE collects them;
# KILL_ONLY=1 leaves out the partition scenario.
#
# The partition scenario: node a's link goes down while its processes live on; PostgreSQL on
# a commits a marker row after the partition; the volume comes back on c; a's link comes back.
# The marker must never be acknowledged nor reach the replicas (the old nexus is fenced by the
# new epoch), c's PostgreSQL sees only what was committed before, and a's replica is resynced.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release}
RUNS=${RUNS:-1}
PGBENCH_SECONDS=${PGBENCH_SECONDS:-10}
# Kill node a this long after pgbench starts.
KILL_AFTER_S=${KILL_AFTER_S:-4}

skip() {
  if [ -n "${CI:-}" ]; then
    echo "e2e-pg: FAILED: $*" >&2
    exit 1
  fi
  echo "e2e-pg: skipped: $*"
  exit 0
}
[ "$(id -u)" -eq 0 ] || skip "needs root (network namespaces, loop devices, mounts)"
for t in ip nsenter etcd nbdfuse fusermount3 losetup blkid mkfs.ext4 runuser curl; do
  command -v "$t" >/dev/null || skip "needs $t (ci/test.sh installs it)"
done
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$PGBIN" ] && [ -x "$PGBIN/initdb" ] || skip "needs PostgreSQL (apt-get install postgresql)"
id postgres >/dev/null 2>&1 || skip "needs the postgres user (the postgresql package makes it)"
[ -e /dev/fuse ] || skip "needs /dev/fuse"
for b in cairn-node cairn-control cairnctl; do
  [ -x "$BIN/$b" ] || skip "needs $BIN/$b (cargo build --release)"
done

W=$(mktemp -d /tmp/cairn-e2e.XXXXXX)
chmod 755 "$W"
TAG="ce$$"
NET=10.231.$(($$ % 200 + 20))
HOST_IP=$NET.254
CONTROL=http://$HOST_IP:10800
ETCD=http://$HOST_IP:23790
NODES=(a b c)
declare -A IP PID NS
i=0
for n in "${NODES[@]}"; do
  i=$((i + 1))
  IP[$n]=$NET.$i
  NS[$n]=$TAG-$n
done
ctl() { "$BIN/cairnctl" "$@"; }
csi_control() { ctl csi --endpoint "unix://$W/control.sock" "$@"; }
csi_node() { local n=$1; shift; ctl csi --endpoint "unix://$W/$n.sock" "$@"; }
pg() { runuser -u postgres -- "$@"; }
now() { date +%s.%N; }
log() { echo "e2e-pg: $*"; }

cleanup() {
  set +e
  for n in "${NODES[@]}"; do
    for d in "$W/$n/mnt" "$W/$n/staging"; do
      [ -d "$d/pgdata" ] && pg "$PGBIN/pg_ctl" -D "$d/pgdata" -m immediate stop >/dev/null 2>&1
    done
  done
  for p in "${PID[@]}" "${CONTROL_PID:-}" "${ETCD_PID:-}"; do
    [ -n "$p" ] && kill -9 "$p" 2>/dev/null
  done
  # The loop devices are listed before the mounts go: once nbdfuse's mount is lazily
  # unmounted, a loop device's backing file reads /nbd, no longer a path under $W.
  local loops
  loops=$(losetup -n -O NAME,BACK-FILE | awk -v w="$W/" 'index($2, w) == 1 {print $1}')
  pkill -9 -f "nbdfuse $W/" 2>/dev/null
  for m in $(grep -o " $W/[^ ]*" /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2>/dev/null
  done
  for l in $loops; do
    losetup -d "$l" 2>/dev/null
  done
  for n in "${NODES[@]}"; do
    ip netns del "${NS[$n]}" 2>/dev/null
  done
  ip link del "$TAG-br" 2>/dev/null
  if [ -z "${KEEP:-}" ]; then rm -rf "$W"; else echo "e2e-pg: kept $W"; fi
}
trap cleanup EXIT

# Wait up to $1 seconds for the command after it to succeed.
wait_until() {
  local limit=$1
  shift
  local end=$(($(date +%s) + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { echo "e2e-pg: gave up waiting for: $*" >&2; return 1; }
    sleep 0.1
  done
}

json() { /usr/bin/python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
node_state() { curl -sf "$CONTROL/v1/nodes/$1" | json "d['state']"; }
node_is() { [ "$(node_state "$1")" = "$2" ]; }
in_sync_count() { curl -sf "$CONTROL/v1/volumes/$1/insync" | json "len(d['in_sync'])"; }
in_sync_is() { [ "$(in_sync_count "$1")" = "$2" ]; }

log "work dir $W, network $NET.0/24"
ip link add "$TAG-br" type bridge
ip addr add "$HOST_IP/24" dev "$TAG-br"
ip link set "$TAG-br" up
for n in "${NODES[@]}"; do
  ip netns add "${NS[$n]}"
  ip link add "$TAG$n" type veth peer name "$TAG${n}p"
  ip link set "$TAG${n}p" netns "${NS[$n]}"
  ip link set "$TAG$n" master "$TAG-br" up
  ip -n "${NS[$n]}" addr add "${IP[$n]}/24" dev "$TAG${n}p"
  ip -n "${NS[$n]}" link set "$TAG${n}p" up
  ip -n "${NS[$n]}" link set lo up
done

etcd --name e2e --data-dir "$W/etcd" --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://$HOST_IP:23791" --initial-advertise-peer-urls "http://$HOST_IP:23791" \
  --initial-cluster "e2e=http://$HOST_IP:23791" >"$W/etcd.log" 2>&1 &
ETCD_PID=$!
disown
wait_until 60 curl -sf "$ETCD/health" || { tail -20 "$W/etcd.log" >&2; exit 1; }
"$BIN/cairn-control" --data-dir "$W/control" --listen "$HOST_IP:10800" --etcd "$ETCD" \
  --csi-endpoint "unix://$W/control.sock" >"$W/control.log" 2>&1 &
CONTROL_PID=$!
disown
wait_until 60 curl -sf "$CONTROL/v1/leader" || { tail -20 "$W/control.log" >&2; exit 1; }

# Stages go through nbdfuse and a loop device (--csi-nbd fuse) even where the kernel has NBD:
# a node's death here is the kill -9 of its cairn-node and its nbdfuse, the same on every
# machine.
start_node() {
  local n=$1 ip=${IP[$1]}
  mkdir -p "$W/$n"
  nsenter --net="/run/netns/${NS[$n]}" "$BIN/cairn-node" --data-dir "$W/$n/data" --pool0-size 2G \
    --control "$CONTROL" --node-id "$n" --zone "z-$n" \
    --nbd-listen "$ip:10809" --admin-listen "$ip:10810" --replica-listen "$ip:10820" \
    --metrics-listen "$ip:9810" --csi-endpoint "unix://$W/$n.sock" --csi-nbd fuse \
    >>"$W/$n/node.log" 2>&1 &
  PID[$n]=$!
  disown
}
for n in "${NODES[@]}"; do start_node "$n"; done
for n in "${NODES[@]}"; do
  wait_until 60 node_is "$n" up || { tail -20 "$W/$n/node.log" "$W/control.log" >&2; exit 1; }
done
log "three nodes up"

# Stages volume $1 on node $2 at its mount point (as kubelet would), after ControllerPublish
# answered $3.
stage_and_publish() {
  local v=$1 n=$2 uri=$3
  csi_node "$n" node-stage "$v" --uri "$uri" --staging "$W/$n/staging"
  csi_node "$n" node-publish "$v" --staging "$W/$n/staging" --target "$W/$n/mnt"
}

start_pg() {
  local n=$1
  mkdir -p "$W/$n/sock"
  chown postgres "$W/$n/sock"
  pg "$PGBIN/pg_ctl" -D "$W/$n/mnt/pgdata" -l "$W/$n/sock/pg.log" -w -t 120 \
    -o "-c listen_addresses='' -k $W/$n/sock -c max_connections=20" start >/dev/null
}

# The test's own check, not a step of the flow: every replica of volume $1 holds the same
# bytes (nexus verify on the node $2 that serves it; exit 1 on any difference). Verify reads
# each region from one replica after another, so it needs a quiet volume: the filesystem is
# still mounted on $2, and ext4 commits its journal up to 5 s after a change (the atime
# updates of pg_checksums' reads among them); `sync` makes that commit land first, else the
# last replica read can show a journal region the others did not have yet (seen: regions in
# the journal, in the middle of the volume, differing on the last replica only).
verify() {
  sync
  ctl node --addr "${IP[$2]}:10810" nexus verify "$1" >"$W/verify.log" || { cat "$W/verify.log" >&2; return 1; }
}

psql_on() { local n=$1; shift; pg "$PGBIN/psql" -h "$W/$n/sock" -U postgres -X -q -tA "$@"; }

# Both scenarios begin alike, through CSI calls only: volume $1 (3 replicas) is created,
# published, staged and published on node $2, and PostgreSQL starts on a new cluster
# (`initdb -k`: data checksums) in the published mount.
pg_on_new_volume() {
  local v=$1 n=$2
  csi_control create-volume "$v" --size 512M --replicas 3 >/dev/null
  local uri
  uri=$(csi_control controller-publish "$v" --node "$n")
  stage_and_publish "$v" "$n" "$uri"
  mkdir "$W/$n/mnt/pgdata"
  chown postgres "$W/$n/mnt/pgdata"
  chmod 700 "$W/$n/mnt/pgdata"
  pg "$PGBIN/initdb" -k -A trust -U postgres -D "$W/$n/mnt/pgdata" >"$W/initdb.log"
  start_pg "$n"
}

# One kill scenario on volume $1: PostgreSQL on node $2, which dies; it comes back on $3.
kill_scenario() {
  local v=$1 from=$2 to=$3
  pg_on_new_volume "$v" "$from"
  pg "$PGBIN/pgbench" -h "$W/$from/sock" -U postgres -i -s 2 -q postgres >"$W/pgbench-init.log" 2>&1
  # pgbench's TPC-B-like transaction, with each history row tagged by its client: a client's
  # commits are acknowledged one after another, so a lost acknowledged commit shows as that
  # client having fewer rows than acknowledgements, whatever other clients left in flight.
  psql_on "$from" -c "alter table pgbench_history add column client int" postgres
  mkdir -p "$W/pgbench" && chown postgres "$W/pgbench"
  rm -f "$W/pgbench/log."*
  cat >"$W/pgbench/tpcb-client.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, client) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP, :client_id);
END;
SQL
  chown postgres "$W/pgbench/tpcb-client.sql"
  (cd "$W/pgbench" && pg "$PGBIN/pgbench" -h "$W/$from/sock" -U postgres -c 4 -j 2 \
    -f "$W/pgbench/tpcb-client.sql" -T "$PGBENCH_SECONDS" -l --log-prefix="$W/pgbench/log" \
    postgres >"$W/pgbench.out" 2>&1) &
  local bench=$!
  sleep "$KILL_AFTER_S"

  # Node $from dies: its cairn-node, its nbdfuse and PostgreSQL, and its link.
  local t0
  t0=$(now)
  kill -9 "${PID[$from]}"
  pkill -9 -f "nbdfuse $W/$from/" || true
  local pm
  pm=$(head -1 "$W/$from/mnt/pgdata/postmaster.pid" 2>/dev/null || true)
  [ -n "$pm" ] && { pkill -9 -P "$pm" || true; kill -9 "$pm" 2>/dev/null || true; }
  ip link set "$TAG$from" down
  wait "$bench" || true
  local committed
  committed=$(cat "$W/pgbench/log"* 2>/dev/null | wc -l)

  # The rescheduled pod: publish on $to (refused until $from's lease expired), stage, start.
  local uri2
  until uri2=$(csi_control controller-publish "$v" --node "$to" 2>"$W/publish.err"); do
    grep -q FailedPrecondition "$W/publish.err" || { cat "$W/publish.err" >&2; return 1; }
    sleep 0.05
  done
  stage_and_publish "$v" "$to" "$uri2"
  start_pg "$to"
  psql_on "$to" -c "create table if not exists e2e_outage(at timestamptz); insert into e2e_outage values (now())" postgres
  local t1
  t1=$(now)
  local outage
  outage=$(/usr/bin/python3 -c "print(f'{$t1 - $t0:.2f}')")
  local rows
  rows=$(psql_on "$to" -c "select count(*) from pgbench_history" postgres)
  log "kill: $committed transactions committed before node $from died; pgbench_history has $rows"
  # Per client: rows >= the commits that client saw acknowledged (the log's first field).
  psql_on "$to" -F ' ' -c "select client, count(*) from pgbench_history group by client" postgres \
    >"$W/rows-per-client"
  cat "$W/pgbench/log"* | /usr/bin/python3 -c '
import collections, sys
acked = collections.Counter(line.split()[0] for line in sys.stdin if line.strip())
rows = dict(l.split() for l in open(sys.argv[1]) if l.strip())
lost = {c: (n, int(rows.get(c, 0))) for c, n in acked.items() if int(rows.get(c, 0)) < n}
if lost:
    sys.exit("e2e-pg: LOST COMMITS per client (acknowledged, rows): %s" % lost)
' "$W/rows-per-client"
  log "outage: $outage s from kill -9 of node $from until PostgreSQL on node $to accepted a write"
  [ -n "${OUTAGE_FILE:-}" ] && echo "$outage" >>"$OUTAGE_FILE"
  [ "$committed" -gt 0 ] || { echo "e2e-pg: pgbench committed nothing before the kill" >&2; return 1; }
  [ "$rows" -ge "$committed" ] || { echo "e2e-pg: LOST COMMITS: $committed committed, $rows rows" >&2; return 1; }
  pg "$PGBIN/pg_ctl" -D "$W/$to/mnt/pgdata" -m fast -w stop >/dev/null
  pg "$PGBIN/pg_checksums" --check -D "$W/$to/mnt/pgdata" >"$W/checksums.log"
  log "pg_checksums --check passed on node $to"

  # Node $from comes back: kubelet's teardown of the dead pod runs there, and its replica is
  # resynced until the volume has three in-sync replicas again.
  ip link set "$TAG$from" up
  start_node "$from"
  wait_until 60 node_is "$from" up
  csi_node "$from" node-unpublish "$v" --target "$W/$from/mnt"
  csi_node "$from" node-unstage "$v" --staging "$W/$from/staging"
  wait_until 120 in_sync_is "$v" 3 || { curl -s "$CONTROL/v1/volumes/$v/insync" >&2; return 1; }
  verify "$v" "$to"
  log "node $from is back; volume $v has three in-sync replicas, and nexus verify finds them equal"

  # Clean up for the next round, as the CO would after the pod and the claim are deleted.
  csi_node "$to" node-unpublish "$v" --target "$W/$to/mnt"
  csi_node "$to" node-unstage "$v" --staging "$W/$to/staging"
  csi_control controller-unpublish "$v" --node "$to"
  csi_control delete-volume "$v"
}

# The partition scenario on volume $1: node $2's link goes down while its processes live on;
# the volume comes back on $3; then the link comes back. A write PostgreSQL on $2 makes after
# the partition (the marker) must never reach the replicas: the old nexus is fenced by the
# new epoch, so it can neither finish that write nor, once the link is back, land it.
partition_scenario() {
  local v=$1 from=$2 to=$3
  pg_on_new_volume "$v" "$from"
  psql_on "$from" -c "create table marker(x text); insert into marker values ('before')" postgres

  ip link set "$TAG$from" down
  local t0
  t0=$(now)
  # The marker: PostgreSQL on $from, still running, commits a row after the partition.
  (psql_on "$from" -c "insert into marker values ('after-partition')" postgres \
    >"$W/marker.out" 2>&1; echo $? >"$W/marker.rc") &
  local marker=$!
  local uri2
  until uri2=$(csi_control controller-publish "$v" --node "$to" 2>"$W/publish.err"); do
    grep -q FailedPrecondition "$W/publish.err" || { cat "$W/publish.err" >&2; return 1; }
    sleep 0.05
  done
  stage_and_publish "$v" "$to" "$uri2"
  # postmaster.pid names $from's postmaster, which on this one machine is a live pid; on two
  # machines it would name nothing $to can see, which is what removing it emulates.
  rm -f "$W/$to/mnt/pgdata/postmaster.pid"
  start_pg "$to"
  psql_on "$to" -c "insert into marker values ('on-$to')" postgres
  log "partition: PostgreSQL on node $to accepted a write $(/usr/bin/python3 -c "print(f'{$(now) - $t0:.2f}')") s after node $from's link went down"

  # The link comes back while $from's nexus and PostgreSQL still run.
  ip link set "$TAG$from" up
  wait_until 60 node_is "$from" up
  # The old nexus is gone or fenced: its marker write fails (or never finishes).
  local waited=0
  while [ ! -e "$W/marker.rc" ] && [ "$waited" -lt 300 ]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  if [ "$(cat "$W/marker.rc" 2>/dev/null)" = 0 ]; then
    echo "e2e-pg: the fenced node's marker write was acknowledged" >&2
    return 1
  fi
  pm=$(head -1 "$W/$from/mnt/pgdata/postmaster.pid" 2>/dev/null || true)
  [ -n "$pm" ] && { pkill -9 -P "$pm" || true; kill -9 "$pm" 2>/dev/null || true; }
  kill "$marker" 2>/dev/null || true
  wait "$marker" 2>/dev/null || true
  psql_on "$to" -c "checkpoint" postgres
  local rows
  rows=$(psql_on "$to" -c "select string_agg(x, ',' order by x) from marker" postgres)
  [ "$rows" = "before,on-$to" ] || { echo "e2e-pg: marker table on $to: '$rows'" >&2; return 1; }
  log "partition: the marker written on node $from after the partition never reached the replicas"
  pg "$PGBIN/pg_ctl" -D "$W/$to/mnt/pgdata" -m fast -w stop >/dev/null
  pg "$PGBIN/pg_checksums" --check -D "$W/$to/mnt/pgdata" >"$W/checksums.log"
  csi_node "$from" node-unpublish "$v" --target "$W/$from/mnt"
  csi_node "$from" node-unstage "$v" --staging "$W/$from/staging"
  wait_until 120 in_sync_is "$v" 3 || { curl -s "$CONTROL/v1/volumes/$v/insync" >&2; return 1; }
  verify "$v" "$to"
  log "partition: node $from's replica is resynced; three in-sync replicas, and nexus verify finds them equal"
  # The raw bytes, not PostgreSQL's view (its buffers and a checkpoint could hide a landed
  # page): the marker is nowhere on the volume, WAL included. verify showed every replica
  # equal, so reading through $to's device (the staging mount's source) reads them all.
  local dev
  dev=$(findmnt -n -o SOURCE --target "$W/$to/staging")
  [ -b "$dev" ] || { echo "e2e-pg: the staging mount on $to has no block device: '$dev'" >&2; return 1; }
  grep -a -q "on-$to" "$dev" || { echo "e2e-pg: $to's own committed row is not in $dev: the scan sees nothing" >&2; return 1; }
  if grep -a -q after-partition "$dev"; then
    echo "e2e-pg: the fenced node's marker is on the volume ($dev)" >&2
    return 1
  fi
  log "partition: the marker is nowhere in the volume's bytes"
  csi_node "$to" node-unpublish "$v" --target "$W/$to/mnt"
  csi_node "$to" node-unstage "$v" --staging "$W/$to/staging"
  csi_control controller-unpublish "$v" --node "$to"
  csi_control delete-volume "$v"
}

for r in $(seq 1 "$RUNS"); do
  kill_scenario "pg$r" a b
done
if [ -z "${KILL_ONLY:-}" ]; then
  partition_scenario pgp a c
fi
log "passed"

#!/usr/bin/env bash
# Runs every command the README shows, in a short form (small sizes, 1 s runtimes), so that a
# README command cannot break unnoticed. ci/test.sh runs it after the test suite.
#
# Each README command is declared, verbatim, with `readme 'TEXT'` before the commands that run
# it here (a README command whose figures take minutes is declared with `not_run 'TEXT' WHY`).
# `bash ci/readme.sh --check` (and every run, first) lists the commands in README.md: every line
# of its ```sh blocks and every inline `cargo …`, `cairn-perf …` and `perf/….sh` command in its
# prose. It fails naming each one this script does not declare, so a new README command needs
# a short form here before CI passes.
set -euo pipefail
cd "$(dirname "$0")/.."

declared=()
readme() {
  declared+=("$1")
  printf '\n--> README: %s\n' "$1"
}
not_run() {
  declared+=("$1")
  printf '\n--> README: %s (not run: %s)\n' "$1" "$2"
}

# The README's commands, one per line: sh-block lines without their comments, and inline
# commands of the prose.
readme_commands() {
  awk '
    /^```sh/ { inblock = 1; next }
    /^```/   { inblock = 0; next }
    inblock {
      line = $0
      sub(/[ \t]+#.*$/, "", line)
      sub(/^[ \t]+/, "", line)
      sub(/[ \t]+$/, "", line)
      if (line != "" && line !~ /^#/) print line
      next
    }
    {
      rest = $0
      while (match(rest, /`[^`]+`/)) {
        span = substr(rest, RSTART + 1, RLENGTH - 2)
        rest = substr(rest, RSTART + RLENGTH)
        if (span ~ /^(cargo (run|build|bench|test) |cairn-perf |([A-Z_]+=("[^"]*"|[^ ]+) )*perf\/[a-z-]+\.sh$)/) print span
      }
    }
  ' README.md | sort -u
}

# Fails naming every README command this script does not declare.
check() {
  local missing=0 cmd
  while IFS= read -r cmd; do
    if ! grep -qF -- "readme '$cmd'" "$0" && ! grep -qF -- "not_run '$cmd'" "$0"; then
      echo "ci/readme.sh: README command not covered: $cmd" >&2
      missing=1
    fi
  done < <(readme_commands)
  if ((missing)); then
    echo "ci/readme.sh: add a short form of each command above (readme '...' then the run)" >&2
    exit 1
  fi
  echo "ci/readme.sh: all $(readme_commands | wc -l) README commands are covered"
}

check
[[ "${1:-}" == "--check" ]] && exit 0

tmp=$(mktemp -d)
node_pid=
up_pid=
cleanup() {
  [[ -n "$node_pid" ]] && kill -9 "$node_pid" 2>/dev/null
  # cairn up's children get SIGTERM from the kernel when it dies (PR_SET_PDEATHSIG).
  [[ -n "$up_pid" ]] && kill -9 "$up_pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
bin=$PWD/target/release

# Starts `cairn up ARGS` in the background, its output in OUT, and waits for its ready line.
up_start() {
  local out=$1
  shift
  "$bin/cairn" up "$@" >"$out" 2>&1 &
  up_pid=$!
  for _ in $(seq 600); do
    grep -q '^cairn up: ready:' "$out" && return 0
    kill -0 "$up_pid" 2>/dev/null || { cat "$out"; exit 1; }
    sleep 0.1
  done
  cat "$out"
  echo "cairn up $*: not ready" >&2
  exit 1
}

# Stops it with SIGINT, as Ctrl-C would: it must exit 0, every child stopped cleanly.
up_stop() {
  local out=$1 rc=0
  kill -INT "$up_pid"
  wait "$up_pid" || rc=$?
  up_pid=
  if ((rc != 0)); then
    cat "$out"
    echo "cairn up exited $rc after SIGINT (want 0)" >&2
    exit 1
  fi
  grep -q 'stopped cleanly' "$out"
  echo "cairn up stopped cleanly on SIGINT"
}

readme 'bash .ci/run'
echo "(this script runs inside it)"

# The main command: its packages are ci/test.sh's (installed before this script runs).
readme 'apt-get update && apt-get install -y build-essential protobuf-compiler libnbd-bin qemu-utils'
dpkg -s build-essential protobuf-compiler libnbd-bin qemu-utils >/dev/null
echo "the main command's packages are installed"

# cairn up on the README's ports, in a temp data dir: wait for its ready line, run the node
# commands it prints against node-1, then stop it with SIGINT as Ctrl-C would.
readme 'cargo build --release -p cairn-control -p cairn-node && target/release/cairn up'
cargo build --release -q -p cairn-control -p cairn-node
up_start "$tmp/up.out" --data-dir "$tmp/up"
cat "$tmp/up.out"
# Its node commands for one node, as printed (cairnctl by its path, then nbdinfo).
grep -E '^  \S*cairnctl node --addr .* (volume create|export add) pg' "$tmp/up.out" |
  while read -r ctl rest; do
    # shellcheck disable=SC2086 # the printed command's words
    "$ctl" $rest
  done
nbdinfo nbd://127.0.0.1:10809/pg | grep -E 'export-size'
# cairn up runs every link with TLS; cairnctl finds its certificate by itself only under
# ./cairn-data, so this temp data dir's is named (docs/security.md).
CAIRN_TLS_DIR="$tmp/up/tls/admin-cairn" "$bin/cairnctl" node ls
up_stop "$tmp/up.out"

# Three nodes, a 3-replica volume placed by the control process, attached on node-1, reached
# over NBD (a temp data dir and a small volume; the commands as the README shows them).
readme 'target/release/cairn up --nodes 3 &'
up_start "$tmp/up3.out" --nodes 3 --size 1G --data-dir "$tmp/up3"
export CAIRN_TLS_DIR="$tmp/up3/tls/admin-cairn"
readme 'target/release/cairnctl volume create demo --size 1G --replicas 3'
"$bin/cairnctl" volume create demo --size 64M --replicas 3
readme 'target/release/cairnctl volume attach demo --node node-1'
"$bin/cairnctl" volume attach demo --node node-1 | tee "$tmp/attach.out"
grep -q 'nbd://127.0.0.1:10809/demo' "$tmp/attach.out"
readme 'target/release/cairnctl volume inspect demo'
"$bin/cairnctl" volume inspect demo
"$bin/cairnctl" volume inspect demo --json | /usr/bin/python3 -c '
import json, sys
v = json.load(sys.stdin)
states = sorted(r["state"] for r in v["replicas"])
assert len({r["node"] for r in v["replicas"]}) == 3, v
assert v["attached"]["node"] == "node-1", v
print("inspect: 3 replicas on 3 nodes,", states, "attached on node-1")'
readme 'nbdinfo nbd://127.0.0.1:10809/demo'
nbdinfo nbd://127.0.0.1:10809/demo | grep -E 'export-size'
up_stop "$tmp/up3.out"
unset CAIRN_TLS_DIR

readme 'cargo build --release -p cairn-node'
cargo build --release -q -p cairn-node

# A lone node, stopped with SIGINT as Ctrl-C would, on the README's port.
readme 'target/release/cairn-node --data-dir ./cairn-data --volume pg:10G'
"$bin/cairn-node" --data-dir "$tmp/cairn-data" --volume pg:10G >"$tmp/node.log" 2>&1 &
node_pid=$!
readme 'nbdinfo nbd://127.0.0.1:10809/pg'
for _ in $(seq 300); do
  nbdinfo nbd://127.0.0.1:10809/pg >"$tmp/nbdinfo.txt" 2>/dev/null && break
  kill -0 "$node_pid" 2>/dev/null || { cat "$tmp/node.log"; exit 1; }
  sleep 0.1
done
nbdinfo nbd://127.0.0.1:10809/pg | grep -E 'export-size|is_read_only'
readme 'qemu-img info nbd://127.0.0.1:10809/pg'
qemu-img info nbd://127.0.0.1:10809/pg | grep 'virtual size'
echo "cairnctl node (docs/node.md):"
ctl=("$bin/cairnctl" node)
"${ctl[@]}" pool ls
"${ctl[@]}" volume create scratch 1G
"${ctl[@]}" export add scratch
"${ctl[@]}" snapshot create scratch scratch-monday
"${ctl[@]}" snapshot clone scratch-monday scratch-test
"${ctl[@]}" volume grow scratch 2G
"${ctl[@]}" nexus create scratch-test --replica local
"${ctl[@]}" export add scratch-test --nexus
"${ctl[@]}" volume ls
"${ctl[@]}" --json stats >/dev/null
readme 'target/release/cairnctl node volume create pg2 1G'
readme 'head -c 64 /dev/urandom > pg2.key && target/release/cairnctl node export add pg2 --key-file pg2.key'
"${ctl[@]}" volume create pg2 1G
head -c 64 /dev/urandom >"$tmp/pg2.key"
"${ctl[@]}" export add pg2 --key-file "$tmp/pg2.key" | grep encrypted
nbdinfo nbd://127.0.0.1:10809/pg2 | grep -E 'export-size'
kill -INT "$node_pid"
rc=0
wait "$node_pid" || rc=$?
node_pid=
if ((rc != 0)); then
  cat "$tmp/node.log"
  echo "cairn-node exited $rc after SIGINT (want 0)" >&2
  exit 1
fi
echo "cairn-node stopped cleanly on SIGINT"

# NBD over TLS: DIR made with openssl as cairn-tls issues it (ECDSA P-256, CN node:ID, the
# address in the SAN, keyEncipherment for qemu), GnuTLS's client names linked.
tls_dir="$tmp/tls"
mkdir -p "$tls_dir"
(
  cd "$tls_dir"
  openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem
  openssl req -x509 -new -key ca-key.pem -subj "/CN=readme CA" -days 2 -out ca-cert.pem
  openssl ecparam -name prime256v1 -genkey -noout -out key.pem
  openssl req -new -key key.pem -subj "/CN=node:readme" -out node.csr
  printf 'subjectAltName=IP:127.0.0.1\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' >ext.cnf
  openssl x509 -req -in node.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
    -extfile ext.cnf -out cert.pem 2>/dev/null
  ln cert.pem client-cert.pem
  ln key.pem client-key.pem
)
readme 'target/release/cairn-node --volume pg:10G --tls-ca DIR/ca-cert.pem --tls-cert DIR/cert.pem --tls-key DIR/key.pem --nbd-tls-required'
"$bin/cairn-node" --data-dir "$tmp/cairn-data-tls" --volume pg:10G --tls-ca "$tls_dir/ca-cert.pem" \
  --tls-cert "$tls_dir/cert.pem" --tls-key "$tls_dir/key.pem" --nbd-tls-required >"$tmp/node-tls.log" 2>&1 &
node_pid=$!
readme 'nbdinfo "nbds://127.0.0.1:10809/pg?tls-certificates=DIR"'
for _ in $(seq 300); do
  nbdinfo "nbds://127.0.0.1:10809/pg?tls-certificates=$tls_dir" >/dev/null 2>&1 && break
  kill -0 "$node_pid" 2>/dev/null || { cat "$tmp/node-tls.log"; exit 1; }
  sleep 0.1
done
nbdinfo "nbds://127.0.0.1:10809/pg?tls-certificates=$tls_dir" | grep -E 'export-size'
if nbdinfo nbd://127.0.0.1:10809/pg >/dev/null 2>&1; then
  echo "a plain client was served under --nbd-tls-required" >&2
  exit 1
fi
readme 'qemu-img info --object tls-creds-x509,id=tls0,dir=DIR,endpoint=client --image-opts driver=nbd,host=127.0.0.1,port=10809,export=pg,tls-creds=tls0'
qemu-img info --object "tls-creds-x509,id=tls0,dir=$tls_dir,endpoint=client" \
  --image-opts driver=nbd,host=127.0.0.1,port=10809,export=pg,tls-creds=tls0 | grep 'virtual size'
kill -INT "$node_pid"
rc=0
wait "$node_pid" || rc=$?
node_pid=
if ((rc != 0)); then
  cat "$tmp/node-tls.log"
  echo "cairn-node with NBD TLS exited $rc after SIGINT (want 0)" >&2
  exit 1
fi
echo "NBD over TLS served and refused a plain client"

readme 'target/release/cairn-pool pool.img create --size 10G'
readme 'target/release/cairn-pool pool.img volume-create pg 4G'
readme 'target/release/cairn-pool pool.img snapshot pg pg-monday'
readme 'target/release/cairn-pool pool.img clone pg-monday pg-test'
readme 'target/release/cairn-pool pool.img ls'
readme 'target/release/cairn-pool pool.img check'
(
  cd "$tmp"
  "$bin/cairn-pool" pool.img create --size 10G
  "$bin/cairn-pool" pool.img volume-create pg 4G
  "$bin/cairn-pool" pool.img snapshot pg pg-monday
  "$bin/cairn-pool" pool.img clone pg-monday pg-test
  "$bin/cairn-pool" pool.img ls
  "$bin/cairn-pool" pool.img check
)

readme 'cargo build --release -p cairn-ffi'
cargo build --release -q -p cairn-ffi
readme 'cc -Iffi/include examples/c/cairn_example.c -Ltarget/release -lcairn -o cairn_example'
cc -Iffi/include examples/c/cairn_example.c -Ltarget/release -lcairn -o "$tmp/cairn_example"
readme 'LD_LIBRARY_PATH=target/release ./cairn_example'
LD_LIBRARY_PATH=target/release "$tmp/cairn_example"
readme 'bash ci/cabi.sh bench'
CAIRN_BENCH_SECS=1 bash ci/cabi.sh bench

# cairn-perf: each mode once, tiny. The volume comparison runs two rounds in one process: the
# second reopens the file the first locked (it failed with "exclusive lock held" once).
perf=(cargo run --release -q -p cairn-perf --)
img=$tmp/cairn-perf.img
readme 'cairn-perf --help'
"${perf[@]}" --help >/dev/null
readme 'cargo run --release -p cairn-perf -- compare --baseline raw --candidate engine --file cairn-perf.img --size 4G --rw randread --qd 32'
"${perf[@]}" compare --baseline raw --candidate engine --file "$img" --size 64M --rw randread \
  --qd 32 --runtime 1 --rounds 1
readme 'cairn-perf compare --file F --size 4G --rounds 3'
"${perf[@]}" compare --raw-wait spin --candidate volume --file "$img" --size 64M --rounds 2 \
  --rw randread --qd 32 --runtime 1
readme 'cairn-perf compare --file F --size 4G --rounds 3 --runtime 5 --json --rw RW --qd QD'
"${perf[@]}" compare --file "$img" --size 64M --rounds 1 --runtime 1 --json --rw randwrite --qd 1 \
  >/dev/null
readme 'cairn-perf compare --candidate volume --encrypt'
"${perf[@]}" compare --candidate volume --encrypt --file "$img" --size 64M --rounds 1 --runtime 1 \
  --rw randrw --qd 32
readme 'cairn-perf idle'
readme 'cairn-perf idle --cores 2 --seconds 10'
"${perf[@]}" idle --cores 2 --seconds 1
readme 'cairn-perf idle --with-pool'
readme 'cairn-perf idle --cores 2 --seconds 10 --with-pool'
"${perf[@]}" idle --cores 2 --seconds 1 --with-pool --file "$tmp/idle.img"
readme 'cairn-perf run --target engine --bdev null --qd 128 --runtime 5'
"${perf[@]}" run --target engine --bdev null --qd 128 --runtime 1
"${perf[@]}" run --target volume --fresh --file "$img" --size 64M --rw randwrite --qd 32 --runtime 1
readme 'cargo bench -p cairn-benches --bench null_submit'
cargo bench -q -p cairn-benches --bench null_submit -- --quick --noplot >/dev/null
readme 'perf/encrypt.sh'
RUNTIME=1 ROUNDS=1 OUT="$(mktemp -d)" perf/encrypt.sh >/dev/null
readme 'cargo bench -p cairn-benches --bench tls_record'
cargo bench -q -p cairn-benches --bench tls_record -- --quick --noplot >/dev/null

readme 'perf/nbd-peers.sh'
readme 'SIZE=1G RUNTIME=5 PARTS=disk perf/nbd-peers.sh'
if command -v fio >/dev/null && command -v qemu-nbd >/dev/null && command -v nbdkit >/dev/null; then
  SIZE=64M RUNTIME=1 OUT="$tmp/nbd-peers" WORKDIR="$tmp/nbd-peers-work" perf/nbd-peers.sh >/dev/null
else
  echo "ci/readme.sh: perf/nbd-peers.sh not run: it needs fio, qemu-nbd and nbdkit"
fi
not_run 'perf/replication.sh' "minutes: two daemons, fio, interleaved 10 s rounds"
not_run 'perf/local.sh' "minutes: 4 GiB comparisons; each of its modes ran above, tiny"
not_run 'PARTS="spin volume" RUNTIME=5 perf/local.sh' "as perf/local.sh"
not_run 'cargo test --release -p cairn-node --test idle -- --nocapture' "ci/test.sh's cargo test --workspace runs it"
not_run 'RUNTIME=5 PARTS="engine spin volume" perf/local.sh' "as perf/local.sh"
not_run 'OLD=<old release dir> perf/ab.sh' "minutes, and needs an older build"
readme 'SIZE=1G RUNTIME=5 ROUNDS=3 PARTS=ram perf/replication.sh'
readme 'FIO_CPU=0 SIZE=1G RUNTIME=5 ROUNDS=3 PARTS=ram perf/replication.sh'
if command -v fio >/dev/null && command -v nbdinfo >/dev/null; then
  for pin in "" 0; do
    FIO_CPU=$pin SIZE=64M RUNTIME=1 ROUNDS=1 PARTS=ram OUT="$tmp/replication-ram" \
      WORKDIR="$tmp/replication-ram-work" perf/replication.sh >/dev/null
  done
else
  echo "ci/readme.sh: PARTS=ram perf/replication.sh not run: it needs fio and nbdinfo"
fi
readme 'FIO_CPU=0 SIZE=1G RUNTIME=5 ROUNDS=3 PARTS=tls perf/replication.sh'
if command -v fio >/dev/null && command -v nbdinfo >/dev/null; then
  SIZE=64M RUNTIME=1 ROUNDS=1 PARTS=tls OUT="$tmp/replication-tls" \
    WORKDIR="$tmp/replication-tls-work" perf/replication.sh >/dev/null
else
  echo "ci/readme.sh: PARTS=tls perf/replication.sh not run: it needs fio and nbdinfo"
fi
readme 'PARTS=resync perf/replication.sh'
if command -v fio >/dev/null && command -v nbdinfo >/dev/null; then
  SIZE=256M RUNTIME=1 PARTS=resync OUT="$tmp/resync" WORKDIR="$tmp/resync-work" \
    perf/replication.sh >/dev/null
else
  echo "ci/readme.sh: PARTS=resync perf/replication.sh not run: it needs fio and nbdinfo"
fi
readme 'perf/rebuild-speed.sh'
if command -v fio >/dev/null; then
  SIZE=64M ROUNDS=1 WORKDIR="$tmp/rebuild-speed" perf/rebuild-speed.sh >/dev/null
  readme 'TARGET_BACKING=ram perf/rebuild-speed.sh'
  TARGET_BACKING=ram SIZE=64M ROUNDS=1 WORKDIR="$tmp/rebuild-speed" perf/rebuild-speed.sh \
    >/dev/null
else
  echo "ci/readme.sh: perf/rebuild-speed.sh not run: it needs fio"
fi
not_run 'perf/scaling.sh' "a 16-core machine; the null and malloc runs above are its modes"

echo
echo "ci/readme.sh: every README command ran (or is declared not run, with why)"

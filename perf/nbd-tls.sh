#!/usr/bin/env bash
# NBD over TLS against plain NBD on one cairn-node (issue 16 item 3; informative, no target):
# one server with --nbd-tls serves a RAM export to both kinds of client, and nbdcopy writes
# SIZE random bytes into it and reads them back, plain and TLS alternating for ROUNDS rounds.
# Prints the server's CPU seconds (utime + stime) and the wall time of each copy pair, and
# the TLS/plain ratio of their sums; the data read back is compared every time.
#
#   perf/nbd-tls.sh                     # SIZE=512M ROUNDS=3
#
# Certificates are made with openssl in a temporary directory (ECDSA P-256, as cairn-tls
# issues them). Report the machine's load with the figures: the ratio is of CPU time, which
# load disturbs less than wall time, but a busy machine still blurs it.
set -euo pipefail
SIZE=${SIZE:-512M}
ROUNDS=${ROUNDS:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/cairn-node}
for tool in nbdcopy openssl; do
    command -v "$tool" >/dev/null || { echo "perf/nbd-tls.sh: needs $tool" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "perf/nbd-tls.sh: build first (cargo build --release -p cairn-node)" >&2; exit 1; }
WORK=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
cd "$WORK"
openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem
openssl req -x509 -new -key ca-key.pem -subj "/CN=perf CA" -days 2 -out ca-cert.pem
openssl ecparam -name prime256v1 -genkey -noout -out key.pem
openssl req -new -key key.pem -subj "/CN=node:perf" -out node.csr
printf 'subjectAltName=IP:127.0.0.1\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' >ext.cnf
openssl x509 -req -in node.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
    -extfile ext.cnf -out cert.pem 2>/dev/null
mkdir client && cp ca-cert.pem client/
BYTES=$(numfmt --from=iec "$SIZE")
head -c "$BYTES" /dev/urandom >src.bin
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN" --data-dir data --nbd-listen "127.0.0.1:$PORT" --admin-listen 127.0.0.1:0 \
    --metrics-listen 127.0.0.1:0 --replica-listen off --malloc "m:$SIZE" \
    --tls-ca ca-cert.pem --tls-cert cert.pem --tls-key key.pem --nbd-tls >server.log 2>&1 &
PID=$!
for _ in $(seq 100); do grep -q "cairn-node ready" server.log 2>/dev/null && break; sleep 0.1; done
grep -q "cairn-node ready" server.log || { cat server.log >&2; exit 1; }
TICK=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
declare -A CPU WALL
for mode in plain tls; do CPU[$mode]=0; WALL[$mode]=0; done
echo "round mode server_cpu_s wall_s"
for round in $(seq "$ROUNDS"); do
    for mode in plain tls; do
        if [ "$mode" = plain ]; then uri="nbd://127.0.0.1:$PORT/m"
        else uri="nbds://127.0.0.1:$PORT/m?tls-certificates=$WORK/client"; fi
        c0=$(cpu); t0=$(date +%s.%N)
        nbdcopy src.bin "$uri"
        nbdcopy "$uri" back.bin
        t1=$(date +%s.%N); c1=$(cpu)
        cmp -s src.bin back.bin || { echo "perf/nbd-tls.sh: $mode read back other bytes" >&2; exit 1; }
        c=$(echo "($c1 - $c0) / $TICK" | bc -l); w=$(echo "$t1 - $t0" | bc -l)
        CPU[$mode]=$(echo "${CPU[$mode]} + $c" | bc -l); WALL[$mode]=$(echo "${WALL[$mode]} + $w" | bc -l)
        printf '%s %s %.2f %.2f\n' "$round" "$mode" "$c" "$w"
    done
done
printf 'TLS/plain: server CPU %.2fx, wall %.2fx (load: %s)\n' \
    "$(echo "${CPU[tls]} / ${CPU[plain]}" | bc -l)" "$(echo "${WALL[tls]} / ${WALL[plain]}" | bc -l)" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"
kill -TERM "$PID"; wait "$PID"; PID=

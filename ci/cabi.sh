#!/usr/bin/env bash
# The C ABI gate: builds libcairn, compiles the C example against the committed header and
# runs it under valgrind memcheck (any error or definite leak fails), runs the NBD client test
# against nbdkit (installed if missing), then the Python ctypes example.
# `bash ci/cabi.sh bench` instead runs the C-vs-Rust async benchmark.
#
# Valgrind note: valgrind serialises threads and keeps its lock while a thread blocks in
# io_uring_enter, so a reactor sleeping there would freeze the process. The example therefore
# runs with CAIRN_EXAMPLE_POLL=1 (idle policy "poll") under valgrind; no suppressions needed.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/cabi
mkdir -p "$out"
cargo build --release -p cairn-ffi
export LD_LIBRARY_PATH="$PWD/target/release${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [[ "${1:-}" == "bench" ]]; then
    cc -O2 -Wall -Wextra -Werror -Iffi/include examples/c/cairn_bench.c -Ltarget/release -lcairn -o "$out/cairn_bench"
    cargo build --release -p cairn-ffi --example rust_bench
    secs="${CAIRN_BENCH_SECS:-5}"
    echo "== C API (libcairn), QD 32, 4 KiB randread =="
    c_iops=$("$out/cairn_bench" "$secs" | tee /dev/stderr | awk '/^iops/ {print $2}')
    echo "== Rust API (IoQueue), QD 32, 4 KiB randread =="
    r_iops=$(target/release/examples/rust_bench "$secs" | tee /dev/stderr | awk '/^iops/ {print $2}')
    python3 -c "print(f'C/Rust IOPS ratio: {$c_iops / $r_iops:.3f}')"
    exit 0
fi

cc -O2 -g -Wall -Wextra -Werror -Iffi/include examples/c/cairn_example.c -Ltarget/release -lcairn -o "$out/cairn_example"
echo "== C example =="
"$out/cairn_example"

if ! command -v valgrind > /dev/null; then
    apt-get update -qq && apt-get install -y valgrind
fi
echo "== C example under valgrind memcheck =="
CAIRN_EXAMPLE_POLL=1 valgrind --error-exitcode=1 --leak-check=full \
    --errors-for-leak-kinds=definite "$out/cairn_example"

echo "== NBD client against nbdkit =="
if ! command -v nbdkit > /dev/null; then
    apt-get update -qq && apt-get install -y nbdkit
fi
cargo test --release -p cairn-ffi --test nbd

echo "== Python ctypes example =="
python3 examples/python/cairn_example.py
echo "C ABI checks passed"

#!/usr/bin/env bash
# Short fuzz run of every target in fuzz/ (cargo-fuzz, libFuzzer).
#
#   ci/fuzz.sh [SECONDS_PER_TARGET]     default 20
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Works on the stable toolchain through
# RUSTC_BOOTSTRAP=1 (cargo-fuzz passes -Z flags to rustc). Each target starts from the seeds
# committed in fuzz/seeds/<target> plus whatever corpus earlier runs left in fuzz/corpus/, and
# uses fuzz/nbd.dict. A crash leaves its input in fuzz/artifacts/<target>/ and fails the script;
# commit that input under fuzz/seeds/<target>/ with the fix.
set -euo pipefail
seconds="${1:-20}"
cd "$(dirname "$0")/../fuzz"
if ! command -v cargo-fuzz >/dev/null; then
    echo "ci/fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)" >&2
    exit 1
fi
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target"
    if [ -d "seeds/$target" ]; then
        cp -n "seeds/$target"/* "corpus/$target/" 2>/dev/null || true
    fi
    echo "== fuzz $target for ${seconds}s"
    cargo fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -dict=nbd.dict -max_len=8192 -rss_limit_mb=2048 -print_final_stats=1
done
echo "ci/fuzz.sh: all targets ran ${seconds}s without a crash"

#!/usr/bin/env bash
# Short fuzz run of every target in fuzz/ (cargo-fuzz, libFuzzer).
#
#   ci/fuzz.sh [SECONDS_PER_TARGET]     default 20
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Works on the stable toolchain through
# RUSTC_BOOTSTRAP=1 (cargo-fuzz passes -Z flags to rustc). Each target starts from the seeds
# committed in fuzz/seeds/<target> plus whatever corpus earlier runs left, and uses
# fuzz/nbd.dict. Nothing is written into the checkout: the build output, the corpus and the
# artifacts live under FUZZ_WORK (default ${XDG_CACHE_HOME:-~/.cache}/cairn-fuzz), and the
# script fails if the checkout's fuzz/ changed. A crash leaves its input in
# FUZZ_WORK/artifacts/<target>/ and fails the script; commit that input under
# fuzz/seeds/<target>/ with the fix.
set -euo pipefail
seconds="${1:-20}"
cd "$(dirname "$0")/../fuzz"
work="${FUZZ_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/cairn-fuzz}"
if ! command -v cargo-fuzz >/dev/null; then
    echo "ci/fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)" >&2
    exit 1
fi
export RUSTC_BOOTSTRAP=1
before=$(git status --porcelain --ignored -- . 2>/dev/null || true)
for target in $(cargo fuzz list); do
    mkdir -p "$work/corpus/$target" "$work/artifacts/$target"
    if [ -d "seeds/$target" ]; then
        cp -n "seeds/$target"/* "$work/corpus/$target/" 2>/dev/null || true
    fi
    echo "== fuzz $target for ${seconds}s (corpus and artifacts in $work)"
    cargo fuzz run --target-dir "$work/target" "$target" "$work/corpus/$target" -- \
        -artifact_prefix="$work/artifacts/$target/" \
        -max_total_time="$seconds" -dict=nbd.dict -max_len=8192 -rss_limit_mb=2048 -print_final_stats=1
done
after=$(git status --porcelain --ignored -- . 2>/dev/null || true)
if [ "$before" != "$after" ]; then
    echo "ci/fuzz.sh: the fuzz run wrote into the checkout:" >&2
    diff <(echo "$before") <(echo "$after") >&2 || true
    exit 1
fi
echo "ci/fuzz.sh: all targets ran ${seconds}s without a crash"

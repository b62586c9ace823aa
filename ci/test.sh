#!/usr/bin/env bash
# The whole test suite: the gate CI runs (see README). Installs what it needs, then runs
# formatting, lints, unit/integration/property tests, the examples, the benchmark smoke and
# every command the README shows (ci/readme.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Debian packages the tests need. Installed only when missing, so reruns are quick.
# The real-client tests (node/tests/real_clients.rs) use qemu-img/qemu-io (qemu-utils),
# nbdinfo/nbdcopy/nbdfuse (libnbd-bin; bookworm has no separate nbdfuse package), fio (its nbd
# engine), fusermount3 (fuse3) and mkfs.ext4/e2fsck (e2fsprogs). The control plane's store and
# membership tests (control/tests/) start their own etcd (etcd-server), and the etcd-client
# crate's build script compiles etcd's protos with protoc (protobuf-compiler). The check of the
# Kubernetes manifests (ci/deploy_check.py) parses them with python3-yaml. The end-to-end
# story (ci/e2e-pg.sh) runs PostgreSQL (postgresql) on a CSI-staged volume.
PACKAGES=(build-essential valgrind nbdkit python3 python3-libnbd python3-yaml qemu-utils libnbd-bin nbd-client fio fuse3 e2fsprogs etcd-server protobuf-compiler postgresql openssl)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  step "installing ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
fi

# The real-client ext4 test needs /dev/fuse and loop devices (it skips when not root).
# Containers and minimal VMs may lack the nodes even where the kernel has the drivers.
if [ "$(id -u)" -eq 0 ]; then
  [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
  [ -e /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229 || echo "warning: no /dev/fuse" >&2
  [ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
  [ -e /dev/loop-control ] || mknod -m 0660 /dev/loop-control c 10 237 || echo "warning: no /dev/loop-control" >&2
  for i in 0 1 2 3 4 5 6 7; do
    [ -e "/dev/loop$i" ] || mknod -m 0660 "/dev/loop$i" b 7 "$i" || true
  done
fi
# Under CI a missing client tool fails the real-client tests instead of skipping them.
export CI="${CI:-1}"

export CARGO_TERM_COLOR=never
step "cargo fmt --check"
cargo fmt --all -- --check

step "every README command has a short form in ci/readme.sh"
bash ci/readme.sh --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
cargo test --workspace --release 2>&1 | tee target/ci-test.log
grep -q "test result:" target/ci-test.log

step "deploy/: the Kubernetes manifests agree with the driver's name, parameters and flags"
/usr/bin/python3 ci/deploy_check.py target/release

step "end to end: PostgreSQL on a 3-replica volume through CSI survives the kill and the partition of its node (ci/e2e-pg.sh)"
bash ci/e2e-pg.sh

step "C ABI: C example under valgrind, NBD client against nbdkit, Python ctypes example"
bash ci/cabi.sh

step "fuzz: every cargo-fuzz target for a few seconds (libFuzzer on stable via RUSTC_BOOTSTRAP)"
command -v cargo-fuzz >/dev/null || cargo install -q cargo-fuzz --locked
bash ci/fuzz.sh "${CAIRN_FUZZ_SECONDS:-10}"

step "examples"
cargo run --release -q -p cairn-examples --bin engine-quickstart

step "benchmark smoke (criterion, one short pass each)"
cargo bench -q -p cairn-benches -- --quick --noplot >/dev/null

step "every README command, short: the daemon + nbdinfo + SIGINT, cairnctl, cairn-pool, libcairn, cairn-perf (ci/readme.sh)"
bash ci/readme.sh

passed=$(grep -Eo '[0-9]+ passed' target/ci-test.log | awk '{s += $1} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed' target/ci-test.log | awk '{s += $1} END {print s + 0}')
step "all passed"
echo "tests: $passed passed, $failed failed"

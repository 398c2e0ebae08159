#!/usr/bin/env bash
# Every test: formatting and lints, the fuzz targets (short run), unit
# tests, and the real-kernel conformance suite (BPF programs loaded and
# attached to sandbox cgroups, pods as network namespaces). Run as root.
# Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f $HOME/.cargo/env ]] && source "$HOME/.cargo/env"

scripts/setup.sh
echo "[test] rustfmt"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check
echo "[test] clippy (host crates)"
cargo clippy --all-targets --quiet -- -D warnings
echo "[test] clippy (kernel programs, BPF target)"
cargo +nightly clippy --quiet -p ambridge-ebpf --release --target bpfel-unknown-none \
    -Z build-std=core -- -D warnings
echo "[test] clippy (fuzz targets, their own workspace)"
cargo clippy --all-targets --quiet --manifest-path fuzz/Cargo.toml --target-dir target -- -D warnings
echo "[test] fuzz targets, 20 s each from the committed seeds"
scripts/fuzz.sh 20
echo "[test] building binaries used by the conformance suite"
cargo build --bins --quiet
echo "[test] unit and conformance tests (companion mode: istio-cni serves ZDS)"
cargo test --no-fail-fast
echo "[test] conformance tests again in replacement mode (ambridge serves ZDS, no iptables)"
AMBRIDGE_TEST_ZDS=serve cargo test --no-fail-fast -p ambridge-conformance --tests
echo "[test] conformance tests again in replacement mode on the macvlan topology"
AMBRIDGE_TEST_TOPOLOGY=macvlan AMBRIDGE_TEST_ZDS=serve cargo test --no-fail-fast -p ambridge-conformance --tests
echo "[test] kernel matrix, quick subset (Debian's kernels in qemu)"
scripts/kernels.sh --quick --out target/kernels
# Not a test: no threshold is checked. It runs so the benchmark cannot rot.
echo "[test] benchmark, quick mode (figures not comparable)"
if ! target/debug/ambridge-bench --quick --out target/bench-quick > target/bench-quick.log 2>&1; then
    cat target/bench-quick.log
    exit 1
fi
echo "[test] benchmark quick mode ran: target/bench-quick/results.md"

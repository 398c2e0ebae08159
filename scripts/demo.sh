#!/usr/bin/env bash
# The main job: build a sandbox node on this machine's kernel, start the
# ambridge daemon on it, send traffic from an enrolled and a non-enrolled pod,
# and print what was redirected. Run as root. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f $HOME/.cargo/env ]] && source "$HOME/.cargo/env"

scripts/setup.sh
echo "[demo] building ambridge, its kernel programs and the sandbox tools"
cargo build --bins --quiet
echo "[demo] running the demo (daemon log: RUST_LOG=debug for more)"
exec target/debug/ambridge-demo

#!/usr/bin/env bash
# The datapath benchmark: no mesh, explicit proxy, iptables capture, ambridge,
# ambridge + sockmap, side by side in one run on this machine's kernel.
# Run as root. Installs what is missing first. Extra arguments go to
# ambridge-bench (`--quick` for a one-minute check, `--rounds N`, `--out DIR`).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f $HOME/.cargo/env ]] && source "$HOME/.cargo/env"

scripts/setup.sh
echo "[bench] building release binaries"
cargo build --release --bins --quiet
echo "[bench] running (results under target/bench unless --out is given)"
exec target/release/ambridge-bench "$@"

#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ (cargo-fuzz, nightly, AddressSanitizer,
# the dev profile of fuzz/Cargo.toml) and runs each for SECONDS (default 20), starting from the committed seeds
# in fuzz/corpus/<target>/. Fails on any crash, hang (an input taking over
# 10 s) or leak, saying where the input that caused it was written and how
# to replay it. `scripts/fuzz.sh 600` is the longer run.
#
# Inputs that reach new code are kept in target/fuzz/corpus/<target>/, so
# each run starts where the last one stopped; the committed seeds are only
# read. Per-target logs: target/fuzz/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f $HOME/.cargo/env ]] && source "$HOME/.cargo/env"

say() { printf '\033[1m[fuzz]\033[0m %s\n' "$*"; }

seconds=${1:-20}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS]: SECONDS per target must be a whole number above 0, not '$seconds'" >&2
    exit 2
fi

build_dir=target/fuzz
logs=$build_dir/logs
mkdir -p "$logs"
fuzz=(cargo +nightly fuzz)
build=(--dev --target-dir "$build_dir")

say "building the fuzz targets"
started=$SECONDS
if ! "${fuzz[@]}" build "${build[@]}" > "$logs/build.log" 2>&1; then
    grep -v '^warning: ambridge@' "$logs/build.log" | tail -n 40
    echo "building the fuzz targets failed; full log: $logs/build.log" >&2
    exit 1
fi
say "built in $((SECONDS - started)) s"

mapfile -t targets < <("${fuzz[@]}" list)
stamp=$build_dir/run-started
failed=()
for target in "${targets[@]}"; do
    corpus=$build_dir/corpus/$target
    artifacts=fuzz/artifacts/$target
    log=$logs/$target.log
    mkdir -p "$corpus" "$artifacts"
    touch "$stamp"
    if "${fuzz[@]}" run "${build[@]}" "$target" "$corpus" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 > "$log" 2>&1; then
        runs=$(grep -oE '^Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' || echo '?')
        coverage=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -n 1 || true)
        say "$target: $runs inputs in ${seconds} s, no crash ($coverage)"
        continue
    fi
    failed+=("$target")
    tail -n 60 "$log"
    found=$(find "$artifacts" -type f -newer "$stamp")
    if [[ -n $found ]]; then
        for input in $found; do
            echo "[fuzz] $target FAILED: the input is in $input" >&2
            echo "[fuzz]   replay: cargo +nightly fuzz run ${build[*]} $target $input" >&2
        done
    else
        echo "[fuzz] $target FAILED without writing an input; log: $log" >&2
    fi
done

if ((${#failed[@]})); then
    echo "[fuzz] ${#failed[@]} of ${#targets[@]} targets failed: ${failed[*]}" >&2
    exit 1
fi
say "${#targets[@]} targets, ${seconds} s each, 0 crashes"

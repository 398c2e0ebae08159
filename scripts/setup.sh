#!/usr/bin/env bash
# Installs what ambridge needs to build and test on a Debian machine with
# rustup's stable and nightly toolchains. Idempotent: each step checks first
# and says what it does. Must run as root (apt, bpffs mount).
#
# `--build-only`: only what `cargo build --release --bins` needs (protoc,
# the nightly's rust-src, bpf-linker), as deploy/Dockerfile's build stage
# runs it; nothing is mounted.
set -euo pipefail

build_only=false
case "${1:-}" in
    "") ;;
    --build-only) build_only=true ;;
    *) echo "usage: setup.sh [--build-only]" >&2; exit 2 ;;
esac

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

BPF_LINKER_VERSION=0.13.0
CARGO_FUZZ_VERSION=0.13.2

if [[ $(id -u) -ne 0 ]]; then
    echo "setup.sh must run as root (it installs packages and mounts bpffs)" >&2
    exit 1
fi

# --- Debian packages -------------------------------------------------------
need_pkgs=()
lean_pkgs=()
command -v protoc >/dev/null || need_pkgs+=(protobuf-compiler)
if ! $build_only; then
    command -v ip >/dev/null || need_pkgs+=(iproute2)
    command -v iptables >/dev/null || need_pkgs+=(iptables)
    command -v conntrack >/dev/null || need_pkgs+=(conntrack)
    command -v bpftool >/dev/null || need_pkgs+=(bpftool)
    # libfuzzer-sys compiles libFuzzer (C++) for the fuzz targets.
    command -v c++ >/dev/null || need_pkgs+=(g++)
    # The monitoring tests check /metrics with promtool and scrape it with a
    # real Prometheus server (its recommends, the exporters, are not needed).
    command -v prometheus >/dev/null && command -v promtool >/dev/null || lean_pkgs+=(prometheus)
    # The kernel matrix (scripts/kernels.sh): qemu boots Debian's kernels,
    # whose packages are checked with gpgv against Debian's keyring and
    # unpacked with dpkg-deb; busybox, cpio and the decompressors build
    # each kernel's initramfs, and kmod (modprobe, depmod) loads its
    # modules, in the guest too.
    command -v qemu-system-x86_64 >/dev/null || lean_pkgs+=(qemu-system-x86)
    command -v modprobe >/dev/null && command -v depmod >/dev/null || need_pkgs+=(kmod)
    # Static: it runs alone in the initramfs.
    [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 || need_pkgs+=(busybox-static)
    command -v cpio >/dev/null || need_pkgs+=(cpio)
    command -v xz >/dev/null || need_pkgs+=(xz-utils)
    command -v zstd >/dev/null || need_pkgs+=(zstd)
    command -v curl >/dev/null || need_pkgs+=(curl)
    command -v gpgv >/dev/null || need_pkgs+=(gpgv)
    [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || need_pkgs+=(debian-archive-keyring)
fi
if ((${#need_pkgs[@]} + ${#lean_pkgs[@]})); then
    say "installing Debian packages: ${need_pkgs[*]} ${lean_pkgs[*]}"
    apt-get update -qq
    if ((${#need_pkgs[@]})); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
    fi
    if ((${#lean_pkgs[@]})); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${lean_pkgs[@]}" >/dev/null
    fi
else
    say "Debian packages present"
fi

# --- deploy/: kubectl (on the image) and kubernetes-validate (PyPI) ---------
if $build_only; then
    : # not needed to build
elif ! command -v kubectl >/dev/null; then
    echo "kubectl is missing: deploy/ is rendered with its kustomize" >&2
    exit 1
fi
KUBERNETES_VALIDATE_VERSION=1.37.0
if $build_only; then
    :
elif [[ "$(kubernetes-validate --version 2>/dev/null)" == "$KUBERNETES_VALIDATE_VERSION" ]]; then
    say "kubernetes-validate $KUBERNETES_VALIDATE_VERSION present"
else
    say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION from PyPI"
    python3 -m pip install --quiet --root-user-action=ignore \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

# --- Rust: nightly rust-src for -Z build-std --------------------------------
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    say "adding rust-src to the nightly toolchain"
    rustup component add rust-src --toolchain nightly
else
    say "nightly rust-src present"
fi

# --- bpf-linker, linked against the nightly's own LLVM ----------------------
# Debian's LLVM is older than the nightly's (22); bpf-linker must use the same
# major version as rustc's bitcode, so it links the nightly's libLLVM.
if bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    say "bpf-linker $BPF_LINKER_VERSION present"
else
    sysroot=$(rustc +nightly --print sysroot)
    libllvm=$(ls "$sysroot"/lib/libLLVM.so.* 2>/dev/null | head -n1 || true)
    if [[ -z $libllvm ]]; then
        echo "no libLLVM.so.* in the nightly sysroot $sysroot/lib" >&2
        exit 1
    fi
    major=$(basename "$libllvm" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
    prefix=${CARGO_HOME:-$HOME/.cargo}/llvm-nightly-prefix
    mkdir -p "$prefix/lib"
    ln -sf "$libllvm" "$prefix/lib/libLLVM.so"
    say "building bpf-linker $BPF_LINKER_VERSION against $(basename "$libllvm") (about two minutes)"
    LLVM_PREFIX=$prefix RUSTFLAGS="-C link-arg=-Wl,-rpath,$sysroot/lib" \
        cargo +stable install bpf-linker --locked --version "$BPF_LINKER_VERSION" \
        --no-default-features --features "llvm-$major" --quiet
fi

if $build_only; then
    say "ready to build"
    exit 0
fi

# --- cargo-fuzz, for the fuzz targets in fuzz/ (scripts/fuzz.sh) -----------
if cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    say "cargo-fuzz $CARGO_FUZZ_VERSION present"
else
    say "installing cargo-fuzz $CARGO_FUZZ_VERSION (about a minute)"
    cargo +stable install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --quiet
fi

# --- bpffs -------------------------------------------------------------------
if ! grep -qs ' /sys/fs/bpf bpf ' /proc/self/mounts; then
    say "mounting bpffs at /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
else
    say "bpffs mounted at /sys/fs/bpf"
fi

# --- cgroup v2 ---------------------------------------------------------------
if ! grep -qs ' cgroup2 ' /proc/self/mounts; then
    echo "no cgroup2 mount found in /proc/self/mounts: ambridge needs cgroup v2" >&2
    exit 1
fi
say "ready"

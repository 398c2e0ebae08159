#!/bin/bash
# Runs inside a matrix VM as its first process, on the host's read-only
# root (see scripts/kernels.sh): gives the guest its own writable places,
# runs each line of the plan (`suite test-binary [filter]`) into the
# results share, and powers off.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mkdir -p /dev/shm
writable="/tmp /run /var/tmp /var/lib /dev/shm"
# The host's root as it is, kept visible (on the guest's own writable
# /dev) before tmpfs covers those places: a checkout below one of them (a
# CI clone in /tmp) is shown again from it. virtio-9p mounts a share once.
mkdir -p /dev/hostroot
mount --bind / /dev/hostroot
for dir in $writable; do
    mount -t tmpfs tmpfs "$dir"
done
for dir in $writable; do
    case $AMBRIDGE_CHECKOUT/ in
    "$dir"/*)
        mkdir -p "$AMBRIDGE_CHECKOUT"
        mount --bind "/dev/hostroot$AMBRIDGE_CHECKOUT" "$AMBRIDGE_CHECKOUT"
        ;;
    esac
done
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
# The kernel loads a module it needs (a bridge, veth, netfilter) with
# this modprobe, which finds the guest kernel's modules in the cache
# rather than in the host's /lib/modules.
printf '#!/bin/sh\nexec modprobe -d %s "$@"\n' "$AMBRIDGE_KERNEL_ROOT" > /tmp/modprobe
chmod +x /tmp/modprobe
echo /tmp/modprobe > /proc/sys/kernel/modprobe
mkdir -p /tmp/results
mount -t 9p -o trans=virtio,version=9p2000.L results /tmp/results
ip link set lo up
{
    uname -a
    dmesg | grep -m1 'Hypervisor detected' || echo "no hypervisor detected: software emulation"
} > /tmp/results/kernel
# What this kernel offers, and whether its verifier takes each program.
"$AMBRIDGE_CHECKOUT/target/debug/ambridge" version > /tmp/results/version.txt 2>&1
# The daemon on its own scratch cgroup: it starts, or refuses at start
# with one line; either way, after it has stopped, whether any link stayed
# pinned (a half-attached datapath).
start_check() {
    local dir=/tmp/start-check cgroup=/sys/fs/cgroup/ambridge-start-check
    local bpffs=/sys/fs/bpf/ambridge-start-check pid
    mkdir -p "$dir" "$cgroup"
    echo "workloads: []" > "$dir/workloads.yaml"
    "$AMBRIDGE_CHECKOUT/target/debug/ambridge" run --cgroup-root "$cgroup" \
        --kubepods-parent "$cgroup" --bpffs "$bpffs" --workloads "$dir/workloads.yaml" \
        --api-socket "$dir/api.sock" --node-netns none --monitoring-address off \
        > "$dir/log" 2>&1 &
    pid=$!
    local answered=0
    for _ in $(seq $((30 * ${AMBRIDGE_TEST_TIME_SCALE:-1}))); do
        kill -0 "$pid" 2> /dev/null || break
        if "$AMBRIDGE_CHECKOUT/target/debug/ambridge" status --api "$dir/api.sock" \
            > /dev/null 2>&1; then
            answered=1
            break
        fi
        sleep 1
    done
    if ((answered)); then
        echo "started"
        kill "$pid"
        wait "$pid"
    elif kill -0 "$pid" 2> /dev/null; then
        echo "hung: running, its API never answered"
        kill "$pid"
        wait "$pid"
    else
        wait "$pid"
        echo "stopped (exit $?): $(grep -v '^\s*$' "$dir/log" | head -1)"
        echo "links pinned after it stopped: $(ls "$bpffs/links" 2> /dev/null | wc -l)"
    fi
}
start_check > /tmp/results/start.txt 2>&1
# A kernel the daemon refuses runs no suite: that it refuses, clearly and
# with nothing attached, is its result.
if grep -q '^started$' /tmp/results/start.txt; then
    cp /tmp/results/plan /tmp/results/plan.run
else
    : > /tmp/results/plan.run
fi
while read -r suite binary filter; do
    echo "[guest] $suite on $(uname -r)"
    # shellcheck disable=SC2086 # the filter is one word or none
    # From the package's directory, as `cargo test` runs it.
    (cd "$AMBRIDGE_CHECKOUT/conformance" && "$binary" $filter) > "/tmp/results/$suite.log" 2>&1
    echo $? > "/tmp/results/$suite.rc"
done < /tmp/results/plan.run
touch /tmp/results/done
sync
echo o > /proc/sysrq-trigger

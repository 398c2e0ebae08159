#!/bin/bash
# Runs inside a matrix VM as its first process, on the host's read-only
# root (see scripts/kernels.sh): gives the guest its own writable places,
# runs each line of the plan (`suite test-binary [filter]`) into the
# results share, and powers off.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mkdir -p /dev/shm
for dir in /tmp /run /var/tmp /var/lib /dev/shm; do
    mount -t tmpfs tmpfs "$dir"
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
while read -r suite binary filter; do
    echo "[guest] $suite on $(uname -r)"
    # shellcheck disable=SC2086 # the filter is one word or none
    # From the package's directory, as `cargo test` runs it.
    (cd "$AMBRIDGE_CHECKOUT/conformance" && "$binary" $filter) > "/tmp/results/$suite.log" 2>&1
    echo $? > "/tmp/results/$suite.rc"
done < /tmp/results/plan
touch /tmp/results/done
sync
echo o > /proc/sysrq-trigger

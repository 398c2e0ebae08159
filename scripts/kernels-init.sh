#!/bin/busybox sh
# The matrix VM's first process (scripts/kernels.sh builds it into each
# kernel's initramfs): loads the modules that mount a virtio-9p root,
# mounts the host's root read-only and hands over to the guest script
# there (AMBRIDGE_GUEST, from the kernel command line).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
    insmod "/modules/$module" || echo "kernels-init: insmod $module failed"
done < /modules/order
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 hostroot /newroot; then
    echo "kernels-init: cannot mount the host's root over virtio-9p"
    echo o > /proc/sysrq-trigger
fi
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec chroot /newroot /bin/bash "$AMBRIDGE_GUEST"

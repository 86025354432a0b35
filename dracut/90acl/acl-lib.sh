#!/bin/sh
# Shared by the acl hooks: open a slot image through dm-verity without a superblock, with the
# parameters of its signed manifest.
#   acl_open_verity NAME PARTITION ROOTHASH HASH_OFFSET DATA_BLOCKS DATA_BS HASH_BS HASH SALT
acl_open_verity() {
    [ -b "/dev/mapper/$1" ] && return 0
    # libdevmapper makes the device node itself instead of waiting on udev for it (the
    # initramfs has no device-mapper udev rules to answer).
    DM_DISABLE_UDEV=1 veritysetup open "$2" "$1" "$2" "$3" --no-superblock \
        --hash-offset="$4" --data-blocks="$5" --data-block-size="$6" --hash-block-size="$7" \
        --hash="$8" --salt="$9"
}

acl_log() {
    echo "acl: $*" > /dev/kmsg
    echo "acl: $*" > /dev/console
}

# The disk the command line names (acl.disk=): a device path, or PARTUUID= of any of its
# partitions (esp/grub.cfg passes the EFI system partition's, since device names change between
# machines: vda under qemu, sda or sdb on Azure). /dev/vda when none is named.
acl_disk_spec() {
    spec="$(getarg acl.disk=)"
    echo "${spec:-/dev/vda}"
}

# That disk's device path; fails while no disk holds it (the hook waits for its next pass).
acl_disk() {
    acl-boot disk "$(acl_disk_spec)" 2> /dev/null
}

# What the kernel's lockdown says ("none", "integrity" or "confidentiality"; the one in use is
# in brackets). Secure Boot turns it on; the initramfs mounts securityfs to read it.
acl_lockdown() {
    [ -e /sys/kernel/security/lockdown ] || mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
    cat /sys/kernel/security/lockdown 2>/dev/null || echo "unknown (no lockdown file)"
}

# This boot of the chosen slot failed before its kernel ran: its try is already spent (acl-boot
# select spent it before choosing), so reboot at once and let the rule choose again. A slot that
# keeps failing runs out of tries and the other one boots; waiting in a shell would spend none.
acl_next_try() {
    acl_log "$*; rebooting for the next try"
    # No sync(1) in the initramfs: the kernel's emergency sync, then the reboot. acl-boot
    # wrote the spent try durably before it chose the slot.
    echo s > /proc/sysrq-trigger
    echo b > /proc/sysrq-trigger
    sleep 10
    die "acl: $*"
}

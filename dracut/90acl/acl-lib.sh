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

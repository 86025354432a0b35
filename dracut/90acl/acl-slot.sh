#!/bin/sh
# initqueue/settled hook (sourced by dracut's init on every pass until the root is there):
# stage 2 opens its own slot through dm-verity; stage 1 chooses a slot and kexecs its kernel.
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh
. /lib/acl-lib.sh

acl_stage2() {
    # The parameters come from stage 1, which verified the slot's signed manifest; the root
    # hash binds every byte of the image.
    part="$(getarg acl.part=)"
    [ -b "$part" ] || return 0
    acl_open_verity acl-root "$part" "$(getarg acl.roothash=)" "$(getarg acl.hashoffset=)" \
        "$(getarg acl.datablocks=)" "$(getarg acl.datablocksize=)" "$(getarg acl.hashblocksize=)" \
        "$(getarg acl.hash=)" "$(getarg acl.salt=)" \
        || die "acl: cannot open slot $(getarg acl.slot=) through dm-verity"
}

acl_stage1() {
    [ -e /run/acl/selected ] && return 0
    disk="$(getarg acl.disk=)"
    disk="${disk:-/dev/vda}"
    [ -b "$disk" ] || return 0
    mkdir -p /run/acl
    : > /run/acl/selected
    if ! acl-boot select --disk "$disk" > /run/acl/boot.env; then
        acl_log "no slot of $disk can boot"
        die "acl: no bootable slot on $disk"
    fi
    . /run/acl/boot.env
    acl_log "stage 1: slot $ACL_SLOT ($ACL_VERSION), tries left: $ACL_TRIES_LEFT"
    acl_open_verity acl-slot "$ACL_PART" "$ACL_ROOTHASH" "$ACL_HASH_OFFSET" "$ACL_DATA_BLOCKS" \
        "$ACL_DATA_BLOCK_SIZE" "$ACL_HASH_BLOCK_SIZE" "$ACL_HASH" "$ACL_SALT" \
        || die "acl: cannot open slot $ACL_SLOT through dm-verity"
    mkdir -p /run/acl/slot
    mount -t erofs -o ro /dev/mapper/acl-slot /run/acl/slot || die "acl: cannot mount slot $ACL_SLOT"
    cmdline="$ACL_CMDLINE acl.slot=$ACL_SLOT acl.version=$ACL_VERSION acl.part=$ACL_PART"
    cmdline="$cmdline acl.roothash=$ACL_ROOTHASH acl.hashoffset=$ACL_HASH_OFFSET"
    cmdline="$cmdline acl.datablocks=$ACL_DATA_BLOCKS acl.datablocksize=$ACL_DATA_BLOCK_SIZE"
    cmdline="$cmdline acl.hashblocksize=$ACL_HASH_BLOCK_SIZE acl.hash=$ACL_HASH acl.salt=$ACL_SALT"
    cmdline="$cmdline root=/dev/mapper/acl-root rootfstype=erofs ro"
    kexec -l /run/acl/slot/boot/vmlinuz --initrd=/run/acl/slot/boot/initrd.img \
        --command-line="$cmdline" || die "acl: cannot load the kernel of slot $ACL_SLOT"
    umount /run/acl/slot
    DM_DISABLE_UDEV=1 veritysetup close acl-slot
    acl_log "stage 1: starting the kernel of slot $ACL_SLOT"
    : > /run/acl/handed-over
    kexec -e
    die "acl: kexec into slot $ACL_SLOT failed"
}

if [ -n "$(getarg acl.roothash=)" ]; then
    acl_stage2
else
    acl_stage1
fi

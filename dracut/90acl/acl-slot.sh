#!/bin/sh
# initqueue/settled hook (sourced by dracut's init on every pass until the root is there):
# stage 2 opens its own slot through dm-verity; stage 1 chooses a slot and kexecs its kernel.
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh
. /lib/acl-lib.sh

acl_stage2() {
    # The command line names only the disk and the slot. acl-boot checks that the slot is the
    # one the gptprio rule chose and reads its signed manifest with the keys and threshold of
    # this initramfs; every dm-verity parameter comes from that manifest, so an edited boot
    # entry cannot open an unsigned image.
    [ -b /dev/mapper/acl-root ] && return 0
    disk="$(acl_disk)" || return 0
    [ -b "$disk" ] || return 0
    slot="$(getarg acl.slot=)"
    mkdir -p /run/acl
    if ! acl-boot verify --disk "$disk" --slot "$slot" > /run/acl/root.env; then
        acl_log "stage 2: slot $slot is not verified for this boot"
        die "acl: slot $slot is not verified for this boot"
    fi
    . /run/acl/root.env
    [ -b "$ACL_PART" ] || return 0
    acl_log "stage 2: slot $ACL_SLOT ($ACL_VERSION), root hash from its signed manifest"
    acl_open_verity acl-root "$ACL_PART" "$ACL_ROOTHASH" "$ACL_HASH_OFFSET" "$ACL_DATA_BLOCKS" \
        "$ACL_DATA_BLOCK_SIZE" "$ACL_HASH_BLOCK_SIZE" "$ACL_HASH" "$ACL_SALT" \
        || die "acl: cannot open slot $ACL_SLOT through dm-verity"
}

acl_stage1() {
    [ -e /run/acl/selected ] && return 0
    disk="$(acl_disk)" || return 0
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
        || acl_next_try "stage 1: cannot open slot $ACL_SLOT through dm-verity"
    mkdir -p /run/acl/slot
    mount -t erofs -o ro /dev/mapper/acl-slot /run/acl/slot || acl_next_try "stage 1: cannot mount slot $ACL_SLOT"
    # Stage 2 is told only which disk and slot; it verifies the slot again itself.
    # The disk by the path found here: a slot's stage 2 built before PARTUUID= was understood
    # still reads it (the first stage and the slots are replaced independently).
    cmdline="$ACL_CMDLINE acl.stage=2 acl.disk=$disk acl.slot=$ACL_SLOT"
    cmdline="$cmdline root=/dev/mapper/acl-root rootfstype=erofs ro"
    # The first-stage set GRUB started (esp/grub.cfg), passed on so that `aclctl first-stage`
    # on the running system knows which set really boots.
    case "$(getarg acl.first_stage=)" in
        a | b) cmdline="$cmdline acl.first_stage=$(getarg acl.first_stage=)" ;;
    esac
    # kexec_file_load (-s), not kexec_load: the kernel reads the files itself and, when it is
    # locked down (Secure Boot), starts only a kernel whose signature its keyrings trust (the
    # distribution's signing key, or one the platform's db or MOK list holds). kexec_load
    # hands over raw segments and a locked-down kernel refuses it outright.
    acl_log "stage 1: lockdown: $(acl_lockdown)"
    if ! err="$(kexec -s -l /run/acl/slot/boot/vmlinuz --initrd=/run/acl/slot/boot/initrd.img \
        --command-line="$cmdline" 2>&1)"; then
        umount /run/acl/slot
        DM_DISABLE_UDEV=1 veritysetup close acl-slot
        acl_next_try "stage 1: the kernel of slot $ACL_SLOT was not loaded (${err:-kexec failed})"
    fi
    umount /run/acl/slot
    DM_DISABLE_UDEV=1 veritysetup close acl-slot
    acl_log "stage 1: starting the kernel of slot $ACL_SLOT"
    : > /run/acl/handed-over
    kexec -e
    acl_next_try "stage 1: kexec into slot $ACL_SLOT failed"
}

if [ "$(getarg acl.stage=)" = 2 ]; then
    acl_stage2
else
    acl_stage1
fi

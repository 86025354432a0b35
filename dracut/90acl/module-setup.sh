#!/bin/bash
# dracut module "acl": the A/B slot boot path (see dracut/README.md).
#
# One initramfs serves both stages, told apart by the kernel command line:
#   stage 1 (no acl.roothash=): acl-boot chooses the slot (gptprio rule, a try spent first,
#     signed manifest from the slot's trailer), the slot is opened through dm-verity, and its
#     own kernel and initramfs are started with kexec;
#   stage 2 (acl.roothash= given by stage 1): the slot is opened through dm-verity again and
#     mounted read-only as the root.
# Build-time inputs (environment): ACL_BOOT_BIN, the acl-boot binary; ACL_TRUST_DIR, the
# directory of trusted *.pub keys built into the initramfs.

check() {
    # Only when asked for (-m acl).
    return 255
}

depends() {
    echo base rootfs-block
    return 0
}

installkernel() {
    instmods virtio_pci virtio_blk virtio_scsi sd_mod nvme dm-mod dm-verity erofs
}

install() {
    inst_multiple veritysetup kexec mount umount mkdir
    inst "${ACL_BOOT_BIN:?ACL_BOOT_BIN must name the acl-boot binary}" /usr/bin/acl-boot
    local k
    for k in "${ACL_TRUST_DIR:?ACL_TRUST_DIR must name the trusted keys directory}"/*.pub; do
        inst_simple "$k" "/etc/acl-update/keys/${k##*/}"
    done
    inst_hook cmdline 90 "$moddir/acl-cmdline.sh"
    inst_hook initqueue/settled 90 "$moddir/acl-slot.sh"
    inst_simple "$moddir/acl-lib.sh" /lib/acl-lib.sh
}

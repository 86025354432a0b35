#!/bin/bash
# dracut module "acl": the A/B slot boot path (see dracut/README.md).
#
# One initramfs serves both stages, told apart by the kernel command line:
#   stage 1 (no acl.stage=2): acl-boot chooses the slot (gptprio rule, a try spent first,
#     signed manifest from the slot's trailer), the slot is opened through dm-verity, and its
#     own kernel and initramfs are started with kexec;
#   stage 2 (acl.stage=2 acl.slot=X from stage 1): acl-boot checks that X is the slot the rule
#     chose and verifies its signed manifest again; the slot is opened through dm-verity with
#     the manifest's parameters and mounted read-only as the root.
# Build-time inputs (environment): ACL_BOOT_BIN, the acl-boot binary; ACL_IMAGE_ROOT, the image
# tree whose agent configuration ([trust] keys and threshold) and trusted keys go into the
# initramfs, at the same paths, so the boot path asks for what the agent asks for.

check() {
    # Only when asked for (-m acl).
    return 255
}

depends() {
    echo base rootfs-block
    return 0
}

installkernel() {
    # Disks: virtio (qemu, KVM), NVMe, and Hyper-V's synthetic SCSI (Azure VMs before NVMe).
    instmods virtio_pci virtio_blk virtio_scsi sd_mod nvme hv_vmbus hv_storvsc dm-mod dm-verity erofs
}

install() {
    inst_multiple veritysetup kexec mount umount mkdir
    inst "${ACL_BOOT_BIN:?ACL_BOOT_BIN must name the acl-boot binary}" /usr/bin/acl-boot
    local root="${ACL_IMAGE_ROOT:?ACL_IMAGE_ROOT must name the image tree}" files f
    if ! files="$("$ACL_BOOT_BIN" trust-files --root "$root")"; then
        dfatal "acl: the image tree $root has no usable trust configuration (see acl-boot's error)"
        exit 1
    fi
    for f in $files; do
        # A key left out would make stage 1 refuse every slot: fail the build instead.
        if ! inst_simple "$root$f" "$f"; then
            dfatal "acl: could not put $root$f into the initramfs"
            exit 1
        fi
    done
    inst_hook cmdline 90 "$moddir/acl-cmdline.sh"
    inst_hook initqueue/settled 90 "$moddir/acl-slot.sh"
    inst_simple "$moddir/acl-lib.sh" /lib/acl-lib.sh
}

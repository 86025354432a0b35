#!/bin/sh
# cmdline hook (sourced by dracut's init): stage 2 mounts its own slot as the root; stage 1
# has no root to mount (it kexecs the chosen slot's kernel from the settled hook), so the root
# is declared handled and the initqueue is told to wait for a file that never appears: the
# settled hook runs until it hands over with kexec.
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh

if [ "$(getarg acl.stage=)" = 2 ]; then
    # root=/dev/mapper/acl-root comes with the command line that stage 1 built; the settled
    # hook creates it from the slot's signed manifest. Any other root would be mounted without
    # dm-verity: refused.
    if [ "$(getarg root=)" != /dev/mapper/acl-root ]; then
        die "acl: stage 2 mounts only /dev/mapper/acl-root, not root=$(getarg root=)"
    fi
    wait_for_dev -n /dev/mapper/acl-root
else
    root="acl-stage1"
    rootok=1
    export root rootok
    echo '[ -e /run/acl/handed-over ]' > "$hookdir/initqueue/finished/acl-stage1.sh"
fi

#!/bin/sh
# /init of the mgpu guest.  By kernel command line:
#   mgpu.test=NAME  run a named guest test, print MGPU-RESULT lines and
#                   "MGPU-DONE rc=N", power off
#   mgpu.agent=1    serve commands from the host on /dev/ttyS1 (see device/harness/vm.py)
#   mgpu.share=1    mount the host's shared directory (9p, tag mgpushare) at /mnt/share
#   mgpu.kmsg=1     copy the kernel log (/dev/kmsg) to /dev/ttyS2 as it is written, so
#                   the host has all of it even if this guest hangs or dies
#   otherwise       an interactive shell on the console; power off when it exits
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
# debugfs: the DRM driver's files (/sys/kernel/debug/dri/N/{ring,bos,faults,errors}).
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo "mgpu guest: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPU(s)"

cmdline_arg() {
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1"=*) echo "${word#*=}"; return ;; esac
    done
}

if [ "$(cmdline_arg mgpu.kmsg)" = 1 ]; then
    stty -F /dev/ttyS2 raw -echo 115200 2>/dev/null
    cat /dev/kmsg > /dev/ttyS2 2>/dev/null &
fi

# mgpu.share=1: the host directory of run_qemu.sh --share DIR (virtio-9p, mount tag
# mgpushare) at /mnt/share.  modprobe fails harmlessly where 9p is built in.
if [ "$(cmdline_arg mgpu.share)" = 1 ]; then
    modprobe 9pnet_virtio 2>/dev/null
    modprobe 9p 2>/dev/null
    mkdir -p /mnt/share
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 mgpushare /mnt/share ||
        echo "mgpu guest: cannot mount the shared directory (9p) at /mnt/share" >&2
fi

run_test() {
    case "$1" in
        boot) echo "MGPU-RESULT kernel=$(uname -r)" ;;
        probe) mgpu-probe find && for bdf in $(mgpu-probe find 2>/dev/null); do
                   mgpu-probe info "$bdf"; done ;;
        *) echo "unknown guest test '$1'" >&2; return 2 ;;
    esac
}

# The host sends "<id> <command>" lines; each answer is framed by BEGIN/END markers so
# that kernel messages or partial output can never be mistaken for a result.  The
# output streams as the command writes it (a host that gives up waiting still has
# what was printed so far).
agent() {
    tty=/dev/ttyS1
    stty -F $tty raw -echo 115200
    exec 3<>$tty
    printf '\n@@MGPU-READY\n' >&3
    while IFS= read -r line <&3; do
        id=${line%% *}
        command=${line#* }
        printf '@@MGPU-BEGIN %s\n' "$id" >&3
        sh -c "$command" >&3 2>&1 </dev/null
        rc=$?
        printf '\n@@MGPU-END %s %d\n' "$id" "$rc" >&3
    done
}

test_name=$(cmdline_arg mgpu.test)
if [ -n "$test_name" ]; then
    run_test "$test_name"
    echo "MGPU-DONE rc=$?"
elif [ "$(cmdline_arg mgpu.agent)" = 1 ]; then
    agent
else
    echo "mgpu guest ready. 'mgpu-probe find' lists GPU instances; 'mgpu-probe info BDF' shows one."
    echo "Exit the shell (Ctrl-D) to power off."
    setsid cttyhack sh
fi
poweroff -f

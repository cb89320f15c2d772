#!/bin/sh
# mgpu-gdb-symbols NAME [FILE]: the gdb command that loads the symbols of the loaded
# module NAME at the addresses it was loaded at; paste it into gdb (run_qemu.sh --gdb
# prints how to start gdb).  FILE is the .ko as gdb finds it (default NAME.ko: gdb
# started with run_qemu.sh's gdbinit is in the --share directory).
name=${1:?usage: mgpu-gdb-symbols NAME [FILE]}
file=${2:-$name.ko}
dir=/sys/module/$(echo "$name" | tr - _)/sections
if [ ! -d "$dir" ]; then
    echo "mgpu-gdb-symbols: module $name is not loaded (lsmod lists the loaded ones)" >&2
    exit 1
fi
line="add-symbol-file $file"
for section in "$dir"/.*; do
    section=${section##*/}
    case $section in
        .|..|.note*|.gnu*|.symtab|.strtab) continue ;;
    esac
    line="$line -s $section $(cat "$dir/$section")"
done
echo "$line"

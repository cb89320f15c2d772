"""The reference DRM driver (guest_images/driver/mgpu_drm_*.c) in a real guest: it binds
and gets a render node, and its IGT-style test program (programs/mgpu-drm-test.c)
passes every subtest: BOs created, mapped through the aperture, filled, copied,
blitted and computed on, fences through syncobjs, sync_files and BO waits, every
ioctl's failure cases, a command the device refuses, a job that outlives the timeout
(device reset and recovery) and a stray aperture access the device reports.  The
guest's kernel log must show the decoded error, the reset and the fault and no WARN,
BUG or Oops; the server must have seen the same resets, faults and resources."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from device.gpu.modes import DeniedPolicy, MappingMode
from device.harness.vm import GuestVM
from guest_images import Runtime, parse_results
from tests.integration.conftest import CreateInstance

pytestmark = pytest.mark.qemu
SUBTESTS = (
    "get_params",
    "bo_create_destroy",
    "gem_close_bad_handle",
    "bo_mmap",
    "submit_fill_syncobj",
    "submit_copy_blit",
    "submit_compute",
    "sync_file_in_syncobj",
    "bo_wait",
    "submit_invalid",
    "faulting_command",
    "hang_reset",
    "aperture_pressure",
    "submit_without_fd",
    "stray_aperture_access",
    "close_frees_everything",
)
LAST = "unbind-with-open-bo"  # run on its own: it unbinds and binds the driver again
KERNEL_TROUBLE = re.compile(r"WARNING:|BUG:|Oops|KASAN|general protection|Call Trace")


def test_drm_driver_passes_its_igt_style_tests(
    runtime: Runtime, instance: CreateInstance, short_tmp: Path, figures: dict[str, float]
) -> None:
    served = instance("gpu0", "mgpu-256", mapping=MappingMode.FAULT, denied=DeniedPolicy.REPORT)
    device = served.device
    with GuestVM(runtime, short_tmp, vfio_user_sockets=[served.endpoint.path]) as vm:
        vm.start()
        vm.check("modprobe mgpu_drm")
        assert "renderD128" in vm.check("ls /dev/dri").split()
        resets_at_probe = device.resets  # the driver resets the device when it binds
        assert resets_at_probe >= 1

        # The test program marks its progress in the kernel log (the serial console, where
        # a stalled run shows how far it got): no rate limit on its /dev/kmsg lines.
        vm.check("echo on > /proc/sys/kernel/printk_devkmsg")
        names = vm.check("mgpu-drm-test --list").split()
        assert names[-1] == LAST and len(names) == len(SUBTESTS) + 1, names
        status, output = vm.run("mgpu-drm-test " + " ".join(names[:-1]), timeout=300)
        result = parse_results(output)
        assert status == 0, output
        failed = [name for name in SUBTESTS if result.get(f"subtest_{name}") != "pass"]
        assert not failed, output
        assert result["fault_fence_status"] == str(-errno.EIO), result
        assert result["hang_fence_status"] == str(-errno.ETIMEDOUT), result
        assert result["stray_read"] == "0xffffffff", result  # the report policy's answer
        assert int(result["aperture_evictions"]) >= 1, result
        assert result["submit_without_fd"] == str(-errno.EMFILE), result
        figures["drm_submit_to_syncobj_us"] = float(result["submit_to_syncobj_us"])
        figures["drm_hang_to_reset_ms"] = float(result["hang_to_reset_ms"])

        # The driver's own account, in debugfs (which /init mounts).
        dri = "$(dirname $(ls /sys/kernel/debug/dri/*/ring | head -1))"
        ring = vm.check(f"cat {dri}/ring")
        assert "timeouts 1 resets 1" in ring, ring
        assert "slots used 0" in ring, ring
        errors = vm.check(f"cat {dri}/errors")
        assert "OUT_OF_BOUNDS 1" in errors, errors
        faults = vm.check(f"cat {dri}/faults")
        stray = device.aperture_size - 4096
        assert f"read offset {stray:#x}" in faults, faults
        assert "0 BOs" in vm.check(f"cat {dri}/bos")

        # The kernel log: decoded messages, nothing alarming.
        dmesg = vm.check("dmesg")
        assert not KERNEL_TROUBLE.search(dmesg), dmesg
        assert "FILL command at ring offset" in dmesg and "OUT_OF_BOUNDS" in dmesg, dmesg
        assert "timed out" in dmesg and "device reset done" in dmesg, dmesg
        assert f"aperture fault: read at BAR2 offset {stray:#x}" in dmesg, dmesg

        # The server saw the same: one reset for the hang, the stray read reported,
        # BO pages served on demand, and every resource freed when the program ended.
        assert device.resets == resets_at_probe + 1
        log = device.window.log
        assert any(r.offset == stray for r in log.of("reported")), log.counters
        assert log.count("served") > 0, log.counters
        assert device.engine.commands_executed > 0
        assert not device.resources.resources, device.resources.resources

        # Unbinding under an open BO and mapping, then closing them, touches no register
        # of a device that is gone (a use after unplug would oops), and binding again works.
        status, output = vm.run(f"mgpu-drm-test {LAST}", timeout=120)
        assert status == 0 and parse_results(output)["subtest_unbind_with_open_bo"] == "pass", (
            output
        )
        dmesg = vm.check("dmesg")
        assert not KERNEL_TROUBLE.search(dmesg), dmesg
        assert not device.resources.resources, device.resources.resources

        # Unbinding is clean, and the raw helper driver still binds afterwards.
        vm.check("rmmod mgpu_drm")
        vm.check("modprobe mgpu")
        assert "mgpu0" in vm.check("ls /dev").split()
        vm.check("rmmod mgpu")
        dmesg = vm.check("dmesg")
        assert not KERNEL_TROUBLE.search(dmesg), dmesg
        assert vm.quit() == 0

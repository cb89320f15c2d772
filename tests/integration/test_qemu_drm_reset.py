"""The DRM driver across the resets a user meets: QMP ``system_reset`` with a job in
flight (the guest reboots, the driver binds and works again) and a device that
vanishes while the driver recovers from a hung job (reported at once as gone, not
polled for seconds under a lock every other path needs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from device.gpu.modes import DeniedPolicy
from device.harness.vm import GuestVM
from guest_images import Runtime, parse_results
from tests.helpers import wait_until
from tests.integration.conftest import CreateInstance

pytestmark = pytest.mark.qemu
KERNEL_TROUBLE = re.compile(r"WARNING:|BUG:|Oops|KASAN|general protection|Call Trace")
RING = "cat /sys/kernel/debug/dri/*/ring"
TIMEOUT_PARAM = "/sys/module/mgpu_drm/parameters/timeout_ms"
SMOKE = "get-params bo-create-destroy bo-mmap submit-fill-syncobj submit-copy-blit"


def start_hung_job(vm: GuestVM, timeout_ms: int) -> None:
    """A job the (injected) engine hang holds: submitted in the background, in flight
    once the driver's debugfs lists it."""
    vm.check(f"echo {timeout_ms} > {TIMEOUT_PARAM}")
    vm.check("(mgpu-drm-test submit-fill-syncobj > /tmp/job.log 2>&1 &)")
    wait_until(lambda: "job " in vm.check(RING), 60, "the job to be in flight", interval=0.2)


def test_system_reset_with_a_job_in_flight_reboots_and_the_driver_works_again(
    runtime: Runtime, instance: CreateInstance, short_tmp: Path
) -> None:
    served = instance("gpu0", "mgpu-256", denied=DeniedPolicy.REPORT)
    with GuestVM(runtime, short_tmp, vfio_user_sockets=[served.endpoint.path]) as vm:
        vm.start()
        vm.check("modprobe mgpu_drm")
        served.device.faults.arm("engine-hang", {})
        start_hung_job(vm, 600_000)
        resets = served.device.resets

        vm.qmp.cmd("system_reset")
        vm.wait_for_reboot()
        assert vm.qmp.cmd("query-status")["status"] == "running"  # type: ignore[index]
        assert served.device.resets > resets  # QEMU reset the device: the hang is gone
        assert "mgpu_drm" not in vm.check("cat /proc/modules")  # a fresh boot

        vm.check("modprobe mgpu_drm")
        status, output = vm.run(f"mgpu-drm-test {SMOKE}", timeout=120)
        assert status == 0, output
        assert parse_results(output)["failed"] == "0", output
        dmesg = vm.dmesg()
        assert not KERNEL_TROUBLE.search(dmesg), dmesg
        assert "render node /dev/dri/renderD128" in dmesg, dmesg
        # The whole log of both boots is on the host.
        assert vm.kernel_log().count("Linux version") == 2


def test_a_device_gone_during_recovery_is_reported_at_once_and_comes_back(
    runtime: Runtime, instance: CreateInstance, short_tmp: Path
) -> None:
    served = instance("gpu0", "mgpu-256", denied=DeniedPolicy.REPORT)
    with GuestVM(runtime, short_tmp, vfio_user_sockets=[served.endpoint.path]) as vm:
        vm.start()
        vm.check("modprobe mgpu_drm")
        served.device.faults.arm("engine-hang", {})
        start_hung_job(vm, 5000)
        # Gone before the job times out: every read all ones from here.
        served.device.faults.arm("surprise-removal", {})

        def recovery_over() -> bool:
            return "recovery failed" in vm.dmesg()

        wait_until(recovery_over, 60, "the driver to give up on the device", interval=0.2)
        dmesg = vm.dmesg()
        assert "device not responding (registers read all ones)" in dmesg, dmesg
        stamps = {
            what: float(re.search(rf"\[\s*([\d.]+)\][^\n]*{what}", dmesg).group(1))  # type: ignore[union-attr]
            for what in ("resetting the device", "recovery failed")
        }
        # A device that reads all ones is gone: no waiting for a reset that cannot come.
        assert stamps["recovery failed"] - stamps["resetting the device"] < 1.0, dmesg
        # New work is refused, not queued behind a dead device.
        status, output = vm.run("mgpu-drm-test bo-create-destroy", timeout=60)
        assert status != 0 and "No such device" in output, output

        served.device.faults.clear()
        vm.check("rmmod mgpu_drm && modprobe mgpu_drm")
        status, output = vm.run(f"mgpu-drm-test {SMOKE}", timeout=120)
        assert status == 0, output
        assert not KERNEL_TROUBLE.search(vm.dmesg())

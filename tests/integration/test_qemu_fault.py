"""Aperture pages on demand with real guests: a first touch reaches the fault callback,
which checks it against the resources placed now; freeing makes the page fault again;
each denied-access policy; and two VMs on one physical GPU never see each other's data."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from device.gpu import abi
from device.gpu.instance.instance import GpuInstance
from device.gpu.modes import DeniedPolicy, MappingMode
from device.gpu.regs import table as regs
from device.harness.vm import GuestError, GuestVM
from device.vfio_user.protocol.constants import PciRegion
from guest_images import Runtime, parse_bdfs, parse_results, pattern_bytes
from tests.integration.conftest import CreateInstance

pytestmark = pytest.mark.qemu
SCRATCH = regs.BY_NAME["SCRATCH"].offset


def res(vm: GuestVM, bdf: str, *args: object) -> dict[str, str]:
    return parse_results(vm.check(f"mgpu-probe res {bdf} {' '.join(map(str, args))}"))


def read32(vm: GuestVM, bdf: str, bar: int, offset: int) -> int:
    return int(parse_results(vm.check(f"mgpu-probe read {bdf} {bar} {offset:#x}"))["value"], 0)


def bdf_of(vm: GuestVM, device: GpuInstance, tag: int) -> str:
    """Tell identical devices apart: the host writes a tag into SCRATCH."""
    device.region_write(PciRegion.BAR0, SCRATCH, tag.to_bytes(4, "little"))
    status, output = vm.run("mgpu-probe find")
    assert status == 0, output
    for bdf in parse_bdfs(output):
        if read32(vm, bdf, 0, SCRATCH) == tag:
            return bdf
    raise AssertionError(f"no device with tag {tag:#x}")


def host_view(device: GpuInstance, offset: int, length: int) -> bytes:
    return device.read_aperture(offset, length)  # the guest's dirty pages written back


@pytest.mark.parametrize("mapping", [MappingMode.FAULT, MappingMode.TRAP], ids=str)
def test_pages_follow_allocations_under_each_policy(
    runtime: Runtime,
    instance: CreateInstance,
    short_tmp: Path,
    figures: dict[str, float],
    mapping: MappingMode,
) -> None:
    served = [
        instance("gpu0", mapping=mapping, denied=DeniedPolicy.DUMMY),
        instance("gpu1", mapping=mapping, denied=DeniedPolicy.REPORT),
    ]
    dummy, report = (s.device for s in served)
    sockets = [s.endpoint.path for s in served]
    with GuestVM(runtime, short_tmp, vfio_user_sockets=sockets) as vm:
        vm.start()
        d, r = bdf_of(vm, dummy, 0xD0), bdf_of(vm, report, 0xE0)

        # dummy: an unallocated page reads as zeros.
        assert read32(vm, d, 2, 0x20000) == 0
        assert dummy.window.log.count("dummy") >= 1
        # Allocate and place: the guest's data lands in device memory.
        handle = int(res(vm, d, "create", 64 * 1024)["handle"])
        offset = int(res(vm, d, "place", handle)["offset"], 0)
        vm.check(f"mgpu-probe fill {d} 2 {offset:#x} 65536 0x1234")
        vm.check(f"mgpu-probe check {d} 2 {offset:#x} 65536 0x1234")
        assert host_view(dummy, offset, 65536) == pattern_bytes(65536, 0x1234)
        if mapping is MappingMode.FAULT:
            assert dummy.window.log.count("served") >= 1
        # Free it: the page faults again and gets the policy, not the old data.
        res(vm, d, "destroy", handle)
        assert read32(vm, d, 2, offset) == 0
        # Allocate again at the same place: scrubbed, then the guest's new data.
        handle = int(res(vm, d, "create", 64 * 1024)["handle"])
        assert int(res(vm, d, "place", handle)["offset"], 0) == offset
        assert read32(vm, d, 2, offset + 4096) == 0
        vm.check(f"mgpu-probe fill {d} 2 {offset:#x} 4096 0x99")
        vm.check(f"mgpu-probe check {d} 2 {offset:#x} 4096 0x99")

        # report: an unallocated page reads all ones and the driver can see the fault.
        assert read32(vm, r, 2, 0x30000) == 0xFFFFFFFF
        assert read32(vm, r, 0, regs.BY_NAME["FAULT_COUNT"].offset) >= 1
        assert read32(vm, r, 0, regs.BY_NAME["FAULT_OFFSET_LO"].offset) == 0x30000
        assert read32(vm, r, 0, regs.BY_NAME["INT_STATUS"].offset) & abi.IntBit.FAULT
        figures[f"{mapping}_faults_served"] = dummy.window.log.count("served")
        figures[f"{mapping}_revocations"] = dummy.window.log.count("revoked")
        assert vm.quit() == 0


def test_sigbus_policy_kills_the_vm_and_the_server_records_why(
    runtime: Runtime, instance: CreateInstance, short_tmp: Path
) -> None:
    served = instance("gpu0", mapping=MappingMode.FAULT, denied=DeniedPolicy.SIGBUS)
    with GuestVM(runtime, short_tmp, vfio_user_sockets=[served.endpoint.path]) as vm:
        vm.start()
        bdf = bdf_of(vm, served.device, 0x5B)
        handle = int(res(vm, bdf, "create", 4096)["handle"])
        offset = int(res(vm, bdf, "place", handle)["offset"], 0)
        vm.check(f"mgpu-probe fill {bdf} 2 {offset:#x} 4096 1")  # allowed: fine
        assert vm.process is not None
        qemu_fds = [
            os.readlink(f"/proc/{vm.process.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{vm.process.pid}/fd")
        ]
        assert "/dev/fuse" not in qemu_fds, "the FUSE connection never leaks into QEMU"
        with pytest.raises(GuestError, match=r"QEMU was killed by SIGBUS"):
            vm.run(f"mgpu-probe read {bdf} 2 {offset + 0x100000:#x}", timeout=60)
        assert vm.process is not None and vm.process.wait(30) == -signal.SIGBUS
        denied = served.device.window.log.of("denied")
        assert denied and denied[-1].offset == offset + 0x100000
    # The instance outlives the VM it crashed, and serves the next one.
    with GuestVM(runtime, short_tmp / "next", vfio_user_sockets=[served.endpoint.path]) as vm:
        vm.start()
        assert read32(vm, bdf_of(vm, served.device, 0x77), 0, 0) == abi.ID_VALUE
        assert vm.quit() == 0


def test_two_vms_on_one_physical_gpu_never_see_each_others_data(
    runtime: Runtime, instance: CreateInstance, short_tmp: Path
) -> None:
    a = instance("a", mapping=MappingMode.FAULT, denied=DeniedPolicy.DUMMY)
    b = instance("b", mapping=MappingMode.FAULT, denied=DeniedPolicy.DUMMY)
    secret = pattern_bytes(8192, 0x5EC2E7)
    with (
        GuestVM(runtime, short_tmp / "vm-a", vfio_user_sockets=[a.endpoint.path]) as vm_a,
        GuestVM(runtime, short_tmp / "vm-b", vfio_user_sockets=[b.endpoint.path]) as vm_b,
    ):
        vm_a.start()
        vm_b.start()
        bdf_a, bdf_b = bdf_of(vm_a, a.device, 0xA), bdf_of(vm_b, b.device, 0xB)
        handle = int(res(vm_a, bdf_a, "create", 8192)["handle"])
        offset = int(res(vm_a, bdf_a, "place", handle)["offset"], 0)
        vm_a.check(f"mgpu-probe fill {bdf_a} 2 {offset:#x} 8192 0x5EC2E7")
        assert host_view(a.device, offset, 8192) == secret
        res(vm_a, bdf_a, "destroy", handle)
        # B allocates the same offsets of its own aperture: its own, zeroed memory.
        handle_b = int(res(vm_b, bdf_b, "create", 8192)["handle"])
        assert int(res(vm_b, bdf_b, "place", handle_b)["offset"], 0) == offset
        status, _ = vm_b.run(f"mgpu-probe check {bdf_b} 2 {offset:#x} 8192 0x5EC2E7")
        assert status != 0, "VM B must not see VM A's data"
        assert host_view(b.device, offset, 8192) == bytes(8192)
        vm_b.check(f"mgpu-probe fill {bdf_b} 2 {offset:#x} 8192 0xB0B")
        # A allocates again: scrubbed, not the secret and not B's data.
        handle = int(res(vm_a, bdf_a, "create", 8192)["handle"])
        int(res(vm_a, bdf_a, "place", handle)["offset"], 0)
        assert read32(vm_a, bdf_a, 2, offset) == 0
        assert host_view(a.device, offset, 8192) == bytes(8192)
        assert host_view(b.device, offset, 8192) == pattern_bytes(8192, 0xB0B)
        assert vm_a.quit() == 0 and vm_b.quit() == 0

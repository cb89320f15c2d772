"""The GPU MMU with real guests: a guest maps, unmaps and remaps resources at aperture
offsets it chooses, windows a large resource through a small aperture, maps over a
page it touched while nothing was there; two VMs share a pool smaller than their
quotas, and each gets exactly its data back across evictions and page-ins."""

from __future__ import annotations

from pathlib import Path

import pytest

from device.control.manager import GpuServer
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.modes import DeniedPolicy, MappingMode
from device.gpu.types import InstanceType
from device.harness.vm import GuestVM
from guest_images import Runtime, parse_results, pattern_bytes
from tests.integration.conftest import CreateInstance
from tests.integration.test_qemu_fault import bdf_of, read32, res

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def map_at(vm: GuestVM, bdf: str, handle: int, where: str, offset: int, length: int) -> int:
    result = parse_results(vm.check(f"mgpu-probe map {bdf} {handle} {where} {offset} {length}"))
    return int(result["offset"], 0)


def test_a_guest_maps_unmaps_remaps_and_windows_through_the_page_table(
    runtime: Runtime, instance: CreateInstance, short_tmp: Path
) -> None:
    served = instance(
        "gpu0", "mgpu-256-win64", mapping=MappingMode.FAULT, denied=DeniedPolicy.REPORT
    )
    device = served.device
    with GuestVM(runtime, short_tmp, vfio_user_sockets=[served.endpoint.path]) as vm:
        vm.start()
        bdf = bdf_of(vm, device, 0x3D)
        # A at an offset the driver chooses; then B at the same offset sees only B.
        a = int(res(vm, bdf, "create", 8192)["handle"])
        assert map_at(vm, bdf, a, "0x100000", 0, 8192) == 0x100000
        vm.check(f"mgpu-probe fill {bdf} 2 0x100000 8192 0x11")
        vm.check(f"mgpu-probe unmap {bdf} 0x100000 8192")
        b = int(res(vm, bdf, "create", 8192)["handle"])
        map_at(vm, bdf, b, "0x100000", 0, 8192)
        assert read32(vm, bdf, 2, 0x100000) == 0, "B is new, zeroed memory"
        vm.check(f"mgpu-probe fill {bdf} 2 0x100000 8192 0x22")
        vm.check(f"mgpu-probe unmap {bdf} 0x100000 8192")
        map_at(vm, bdf, a, "0x200000", 0, 8192)  # A again, elsewhere: its data intact
        vm.check(f"mgpu-probe check {bdf} 2 0x200000 8192 0x11")
        assert device.read_aperture(0x200000, 8192) == pattern_bytes(8192, 0x11)
        # A page touched while nothing was mapped there: all ones (report), the write
        # is dropped, and mapping C over it shows C, never the dirty dummy page.
        assert read32(vm, bdf, 2, 0x300000) == 0xFFFFFFFF
        vm.check(f"mgpu-probe write {bdf} 2 0x300000 0xdeadbeef")
        c = int(res(vm, bdf, "create", 4096)["handle"])
        map_at(vm, bdf, c, "0x300000", 0, 4096)
        assert read32(vm, bdf, 2, 0x300000) == 0
        assert device.read_aperture(0x300000, 4096) == bytes(4096)
        # A 96 MiB resource through the 64 MiB aperture, one 32 MiB window at a time.
        assert device.aperture_size == 64 * MiB
        big = int(res(vm, bdf, "create", 96 * MiB)["handle"])
        for k in range(3):
            map_at(vm, bdf, big, "0x1000000", k * 32 * MiB, 32 * MiB)
            vm.check(f"mgpu-probe fill {bdf} 2 {0x1000000 + 32 * MiB - 4096:#x} 4096 {k + 1}")
            vm.check(f"mgpu-probe unmap {bdf} 0x1000000 {32 * MiB}")
        for k in range(3):
            offset = map_at(vm, bdf, big, "any", k * 32 * MiB, 32 * MiB)
            vm.check(f"mgpu-probe check {bdf} 2 {offset + 32 * MiB - 4096:#x} 4096 {k + 1}")
            vm.check(f"mgpu-probe unmap {bdf} {offset:#x} {32 * MiB}")
        assert device.window.log.count("write_dropped") >= 1
        assert vm.quit() == 0


@pytest.mark.parametrize(
    ("mapping", "pool"),
    # Trap mode makes every guest access a message: a small pool keeps it quick.
    [(MappingMode.FAULT, 16 * MiB), (MappingMode.TRAP, 32 * 1024)],
    ids=str,
)
def test_two_vms_share_a_pool_smaller_than_their_quotas_and_lose_no_byte(
    runtime: Runtime, short_tmp: Path, mapping: MappingMode, pool: int
) -> None:
    itype = InstanceType("half", pool, 1, "the whole pool, as a limit")
    with GpuServer(PhysicalGpu(pool, 4, (itype,), overcommit=2.0)) as server:
        one, two = (
            server.create_instance(
                name, "half", short_tmp / f"{name}.sock", mapping=mapping,
                denied=DeniedPolicy.REPORT,
            )
            for name in ("one", "two")
        )  # fmt: skip
        size = pool // 4 * 3
        with (
            GuestVM(runtime, short_tmp / "vm1", vfio_user_sockets=[one.endpoint.path]) as vm1,
            GuestVM(runtime, short_tmp / "vm2", vfio_user_sockets=[two.endpoint.path]) as vm2,
        ):
            vm1.start()
            vm2.start()
            bdf1, bdf2 = bdf_of(vm1, one.device, 0x1), bdf_of(vm2, two.device, 0x2)
            # VM1 fills most of the pool while VM2 is idle.
            h1 = int(res(vm1, bdf1, "create", size)["handle"])
            at1 = map_at(vm1, bdf1, h1, "any", 0, size)
            vm1.check(f"mgpu-probe fill {bdf1} 2 {at1:#x} {size} 0x51", timeout=120)
            # VM2 allocates: VM1's idle resource is evicted to make room.
            h2 = int(res(vm2, bdf2, "create", size)["handle"])
            assert server.physical.evictions >= 1
            at2 = map_at(vm2, bdf2, h2, "any", 0, size)
            vm2.check(f"mgpu-probe fill {bdf2} 2 {at2:#x} {size} 0x52", timeout=120)
            # VM1 touches its pages again: paged in at fault time (evicting VM2's),
            # every word checked in the guest; then VM2 checks its own the same way.
            vm1.check(f"mgpu-probe check {bdf1} 2 {at1:#x} {size} 0x51", timeout=120)
            vm2.check(f"mgpu-probe check {bdf2} 2 {at2:#x} {size} 0x52", timeout=120)
            usage = server.physical.usage()
            assert usage["evictions"] >= 2 and usage["page_ins"] >= 2, usage
            assert one.device.read_aperture(at1, 4096) == pattern_bytes(4096, 0x51)
            kinds = {r.kind for r in one.device.window.log.records}
            assert {"evicted", "paged_in"} <= kinds
            assert vm1.quit() == 0 and vm2.quit() == 0


@pytest.mark.parametrize(
    ("mapping", "pages", "rounds"), [(MappingMode.FAULT, 8, 100), (MappingMode.TRAP, 2, 5)], ids=str
)
def test_device_writes_and_guest_writes_to_the_same_pages_lose_nothing(
    runtime: Runtime,
    instance: CreateInstance,
    short_tmp: Path,
    figures: dict[str, float],
    mapping: MappingMode,
    pages: int,
    rounds: int,
) -> None:
    served = instance("gpu0", mapping=mapping, denied=DeniedPolicy.REPORT)
    with GuestVM(runtime, short_tmp, vfio_user_sockets=[served.endpoint.path]) as vm:
        vm.start()
        bdf = bdf_of(vm, served.device, 0x4A)
        handle = int(res(vm, bdf, "create", pages * 4096)["handle"])
        at = map_at(vm, bdf, handle, "any", 0, pages * 4096)
        result = parse_results(
            vm.check(f"mgpu-probe race {bdf} {at:#x} {pages} {rounds}", timeout=300)
        )
        assert result["mismatches"] == "0", result
        assert int(result["guest_writes"]) >= rounds * pages * 512
        figures[f"race_{mapping}_ms_per_round"] = int(result["ns"]) / 1e6 / rounds
        assert vm.quit() == 0

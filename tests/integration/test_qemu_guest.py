"""End to end: a real Linux guest in QEMU (TCG) sees our Python vfio-user GPU.

Driven through QMP (qemu.qmp) and a command agent on the guest's second serial port.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp.util import get_or_create_event_loop

from device.gpu import abi
from device.gpu.instance.identity import DEVICE_ID, VENDOR_ID
from device.gpu.modes import InterruptMode
from device.harness.pytest_plugin import CreateGuest
from device.harness.vm import GuestVM
from device.vfio_user.protocol.constants import PciRegion
from guest_images import Runtime, parse_bdfs, parse_results, pattern_bytes
from tests.helpers import wait_until
from tests.integration.conftest import CreateInstance

pytestmark = pytest.mark.qemu


def find_gpus(vm: GuestVM) -> list[str]:
    status, output = vm.run("mgpu-probe find")
    return [] if status else parse_bdfs(output)


def wait_for_gpu_count(vm: GuestVM, count: int, timeout: float = 60.0) -> float:
    """Poll the guest until it enumerates ``count`` GPUs; returns the seconds it took."""
    return wait_until(
        lambda: len(find_gpus(vm)) == count, timeout, f"the guest to see {count} GPU(s)", 0.2
    )


def test_guest_sees_gpu_registers_aperture_and_hotplug(
    instance: CreateInstance, mgpu_vm: CreateGuest, figures: dict[str, float]
) -> None:
    # gpu0 has MSI-X (the default); gpu1 uses MSI, because QEMU 11.1.3 aborts when it
    # hot-unplugs a vfio-user device with MSI-X.
    gpu0 = instance("gpu0")
    gpu1 = instance("gpu1", interrupts=InterruptMode.MSI)
    device = gpu0.device
    with mgpu_vm([gpu0, gpu1]) as vm:
        assert vm.boot_seconds is not None
        figures["boot_to_agent_s"] = round(vm.boot_seconds, 2)

        # Enumeration: our IDs, class, BAR sizes and capabilities.
        bdfs = find_gpus(vm)
        assert len(bdfs) == 2
        infos = {bdf: parse_results(vm.check(f"mgpu-probe info {bdf}")) for bdf in bdfs}
        by_caps = {info["caps"]: bdf for bdf, info in infos.items()}
        assert set(by_caps) == {"01,11,10", "01,05,10"}, by_caps  # PM, MSI-X|MSI, PCIe
        bdf = by_caps["01,11,10"]
        info = infos[bdf]
        assert int(info["vendor"], 16) == VENDOR_ID
        assert int(info["device"], 16) == DEVICE_ID
        assert int(info["class"], 16) == 0x030200
        assert int(info["config_size"]) == 4096
        assert int(info["bar0_size"], 0) == abi.BAR0_SIZE
        assert int(info["bar2_size"], 0) == device.aperture_size
        assert int(info["bar2_flags"], 0) & 0x2000, "BAR2 is prefetchable"
        assert int(info["bar4_size"], 0) == 16 * 1024
        assert int(infos[by_caps["01,05,10"]]["bar4_size"], 0) == 0

        # Trapped registers: each guest access is a REGION message to our server.
        reads_before = device.region_access_count.get(PciRegion.BAR0, 0)
        ident = parse_results(vm.check(f"mgpu-probe read {bdf} 0 0x0"))
        assert int(ident["value"], 0) == abi.ID_VALUE
        assert device.region_access_count[PciRegion.BAR0] > reads_before
        vm.check(f"mgpu-probe write {bdf} 0 0x8 0x5a5aa5a5")
        assert device.registers.get("SCRATCH") == 0x5A5AA5A5
        latency = parse_results(vm.check(f"mgpu-probe latency {bdf} 0 0x0 1000"))
        figures["trapped_read_median_us"] = int(latency["median_ns"]) / 1000
        figures["trapped_read_p99_us"] = int(latency["p99_ns"]) / 1000

        # Aperture: guest writes land in device memory without any REGION message.
        offset, length, seed = 0x10000, 256 * 1024, 0x1234ABCD
        assert device.region_access_count.get(PciRegion.BAR2, 0) == 0
        fill = parse_results(vm.check(f"mgpu-probe fill {bdf} 2 {offset:#x} {length} {seed:#x}"))
        figures["aperture_write_ns_per_word"] = float(fill["ns_per_word"])
        assert bytes(device.aperture[offset : offset + length]) == pattern_bytes(length, seed)
        vm.check(f"mgpu-probe check {bdf} 2 {offset:#x} {length} {seed:#x}")
        assert device.region_access_count.get(PciRegion.BAR2, 0) == 0

        # Hot-unplug gpu1: the guest releases it, QEMU disconnects from our server.
        served_before = gpu1.endpoint.clients_served
        started = time.monotonic()
        vm.hot_unplug("gpu1")
        figures["device_del_to_deleted_s"] = round(time.monotonic() - started, 3)
        wait_for_gpu_count(vm, 1)
        wait_until(
            lambda: gpu1.endpoint.clients_served != served_before, 10, "QEMU to disconnect", 0.05
        )
        assert gpu1.endpoint.clients_served == served_before + 1, "QEMU did not disconnect"
        assert gpu0.endpoint.session is not None, "gpu0 must be unaffected"

        # Hot-plug it back on its PCIe root port: QEMU reconnects, realizes it and
        # resets it (DEVICE_RESET), as it does for any newly plugged device.
        resets_before = gpu1.device.resets
        started = time.monotonic()
        vm.hot_plug("gpu1", "rp1", gpu1.endpoint.path)
        figures["device_add_realize_s"] = round(time.monotonic() - started, 3)
        figures["hotplug_visible_in_guest_s"] = round(wait_for_gpu_count(vm, 2), 3)
        back = next(b for b in find_gpus(vm) if b != bdf)
        ident = parse_results(vm.check(f"mgpu-probe read {back} 0 0x0"))
        assert int(ident["value"], 0) == abi.ID_VALUE
        assert gpu1.device.resets > resets_before
        # gpu0 kept working all along.
        vm.check(f"mgpu-probe check {bdf} 2 {offset:#x} {length} {seed:#x}")

        assert vm.quit() == 0


def test_message_based_dma_with_guest_ram_that_is_not_fd_backed(
    runtime: Runtime, instance: CreateInstance, short_tmp: Path, figures: dict[str, float]
) -> None:
    """Guest RAM without an fd: QEMU maps it with no fd, and every device DMA becomes
    a DMA_READ/DMA_WRITE message that QEMU serves."""
    gpu = instance("gpu0")
    with GuestVM(runtime, short_tmp, vfio_user_sockets=[gpu.endpoint.path], shared_ram=False) as vm:
        vm.start()
        session = gpu.endpoint.session
        assert session is not None
        assert len(session.dma) > 0 and all(r.mapping is None for r in session.dma.regions)
        bdf = find_gpus(vm)[0]
        to_aperture = parse_results(vm.check(f"mgpu-probe dma {bdf} to-aperture 0x3000 4096 0x77"))
        assert to_aperture["mismatches"] == "0" and to_aperture["status"] == "2", to_aperture
        assert bytes(gpu.device.aperture[0x3000:0x4000]) == pattern_bytes(4096, 0x77)
        figures["message_dma_4k_to_device_us"] = int(to_aperture["dma_ns"]) / 1000
        from_aperture = parse_results(
            vm.check(f"mgpu-probe dma {bdf} from-aperture 0x5000 4096 0x99")
        )
        assert from_aperture["mismatches"] == "0", from_aperture
        figures["message_dma_4k_from_device_us"] = int(from_aperture["dma_ns"]) / 1000
        assert vm.quit() == 0


def test_qemu_killed_with_sigkill_leaves_nothing_behind_in_the_server(
    runtime: Runtime, instance: CreateInstance, short_tmp: Path
) -> None:
    gpu = instance("gpu0")
    get_or_create_event_loop()  # qemu.qmp's per-thread loop (3 fds) is the harness's
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    with GuestVM(runtime, short_tmp, vfio_user_sockets=[gpu.endpoint.path]) as vm:
        vm.start()
        session = gpu.endpoint.session
        assert session is not None and len(session.dma) > 0
        vm.check("mgpu-probe find")
        assert vm.process is not None
        os.kill(vm.process.pid, signal.SIGKILL)
        vm.process.wait(30)
        wait_until(lambda: gpu.endpoint.session is None, 10, "the session to end", 0.05)
        assert gpu.endpoint.session is None, "the server noticed QEMU is gone"
    maps = Path("/proc/self/maps").read_text()
    assert "memfd:memory-backend-memfd" not in maps, "guest RAM is no longer mapped"
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert threading.active_count() == threads_before
    # The instance serves the next VM.
    with GuestVM(runtime, short_tmp / "again", vfio_user_sockets=[gpu.endpoint.path]) as vm:
        vm.start()
        bdf = find_gpus(vm)[0]
        ident = parse_results(vm.check(f"mgpu-probe read {bdf} 0 0x0"))
        assert int(ident["value"], 0) == abi.ID_VALUE
        assert vm.quit() == 0

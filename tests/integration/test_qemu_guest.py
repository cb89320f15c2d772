"""End to end: a real Linux guest in QEMU (TCG) sees our Python vfio-user GPU.

Driven through QMP (qemu.qmp) and a command agent on the guest's second serial port.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from device.vm import GuestVM

from device.gpu import registers as regs
from device.gpu.instance import DEVICE_ID, VENDOR_ID, GpuInstance
from device.protocol.constants import PciRegion
from device.server import Endpoint
from guest_images import Runtime, parse_results, pattern_bytes

pytestmark = pytest.mark.qemu


def find_gpu(vm: GuestVM) -> str:
    return parse_results(vm.check("mgpu-probe find"))["bdf"]


def wait_for_gpu(vm: GuestVM, present: bool, timeout: float = 60.0) -> float:
    """Poll the guest until the GPU is (or is no longer) enumerated; returns seconds."""
    start = time.monotonic()
    while True:
        rc, _ = vm.run("mgpu-probe find")
        if (rc == 0) == present:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            state = "appear" if present else "disappear"
            raise AssertionError(f"GPU did not {state} in the guest within {timeout}s")
        time.sleep(0.5)


def test_guest_sees_gpu_registers_aperture_and_hotplug(
    runtime: Runtime, gpu: tuple[GpuInstance, Endpoint], short_tmp: Path
) -> None:
    device, endpoint = gpu
    figures: dict[str, float] = {}
    vm = GuestVM(runtime, short_tmp, vfio_user_sockets=[endpoint.path])
    with vm:
        started = time.monotonic()
        vm.start()
        figures["boot_to_agent_s"] = time.monotonic() - started

        # Enumeration: our IDs, class, BAR sizes and capabilities.
        bdf = find_gpu(vm)
        info = parse_results(vm.check(f"mgpu-probe info {bdf}"))
        assert int(info["vendor"], 16) == VENDOR_ID
        assert int(info["device"], 16) == DEVICE_ID
        assert int(info["class"], 16) == 0x030200
        assert int(info["bar0_size"], 0) == regs.BAR0_SIZE
        assert int(info["bar2_size"], 0) == device.aperture_size
        assert int(info["bar4_size"], 0) == 16 * 1024
        caps = info["caps"].split(",")
        assert {"01", "10", "11"} <= set(caps), caps

        # Trapped registers: each guest access is a REGION message to our server.
        reads_before = device.region_access_count.get(PciRegion.BAR0, 0)
        ident = parse_results(vm.check(f"mgpu-probe read {bdf} 0 0x0"))
        assert int(ident["value"], 0) == regs.ID_VALUE
        assert device.region_access_count[PciRegion.BAR0] > reads_before
        vm.check(f"mgpu-probe write {bdf} 0 0x8 0x5a5aa5a5")
        assert device.register_values[regs.BY_NAME["SCRATCH"].offset] == 0x5A5AA5A5
        latency = parse_results(vm.check(f"mgpu-probe latency {bdf} 0 0x0 500"))
        figures["trapped_read_median_us"] = int(latency["median_ns"]) / 1000
        figures["trapped_read_p99_us"] = int(latency["p99_ns"]) / 1000

        # Aperture: guest writes land in the server's memfd without any REGION message.
        offset, length, seed = 0x10000, 64 * 1024, 0x1234ABCD
        aperture_msgs = device.region_access_count.get(PciRegion.BAR2, 0)
        vm.check(f"mgpu-probe fill {bdf} 2 {offset:#x} {length} {seed:#x}")
        assert device.aperture[offset : offset + length] == pattern_bytes(length, seed)
        vm.check(f"mgpu-probe check {bdf} 2 {offset:#x} {length} {seed:#x}")
        assert device.region_access_count.get(PciRegion.BAR2, 0) == aperture_msgs == 0

        # Hot-unplug: the guest ejects the device, QEMU disconnects from our server.
        clients_before = endpoint.clients_served
        vm.hot_unplug("gpu0")
        wait_for_gpu(vm, present=False)
        deadline = time.monotonic() + 10
        while endpoint.clients_served == clients_before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert endpoint.clients_served == clients_before + 1, "QEMU did not disconnect"

        # Hot-plug on a PCIe root port: the server accepts the new connection.
        started = time.monotonic()
        vm.hot_plug("gpu0", "rp0", endpoint.path)
        figures["device_add_realize_s"] = time.monotonic() - started
        figures["hotplug_visible_s"] = wait_for_gpu(vm, present=True)
        bdf = find_gpu(vm)
        ident = parse_results(vm.check(f"mgpu-probe read {bdf} 0 0x0"))
        assert int(ident["value"], 0) == regs.ID_VALUE
        # Device state survives the reconnect; the aperture still holds the pattern.
        vm.check(f"mgpu-probe check {bdf} 2 {offset:#x} {length} {seed:#x}")

        vm.quit()
    print("MGPU-FIGURES " + json.dumps(figures))

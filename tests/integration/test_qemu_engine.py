"""A guest program drives the GPU engine the way a driver does: resources, a command
ring in guest memory, a copy and a SAXPY, and a fence whose interrupt it waits for
(through the small guest driver, which owns the MSI-X or MSI vectors)."""

from __future__ import annotations

import pytest

from device.gpu.modes import InterruptMode
from device.harness.pytest_plugin import CreateGuest
from guest_images import parse_results
from tests.integration.conftest import CreateInstance

pytestmark = pytest.mark.qemu


def test_guest_submits_through_the_ring_and_gets_the_fence_interrupt(
    instance: CreateInstance, mgpu_vm: CreateGuest, figures: dict[str, float]
) -> None:
    msix = instance("gpu0")
    msi = instance("gpu1", interrupts=InterruptMode.MSI)
    with mgpu_vm([msix, msi]) as vm:
        # QEMU's memory-backend-memfd seals guest RAM against shrinking: the server maps
        # it and DMAs directly (any other fd would be served by messages).
        for served in (msix, msi):
            session = served.endpoint.session
            assert session is not None
            ram = max(session.dma.regions, key=lambda r: r.size)
            assert ram.mapping is not None, "QEMU's guest RAM memfd was not mapped"
        vm.check("modprobe mgpu")
        assert sorted(vm.check("ls /dev | grep mgpu").split()) == ["mgpu0", "mgpu1"]
        for index in (0, 1):
            result = parse_results(vm.check(f"mgpu-ring {index}", timeout=120))
            assert result["fence"] == "42" and result["fence_register"] == "42", result
            assert result["copy_ok"] == "1" and result["saxpy_ok"] == "1", result
            assert int(result["interrupts"]) >= 1
            figures[f"ring_submit_to_fence_irq_us_{index}"] = float(
                result["submit_to_interrupt_us"]
            )
        # The interrupts really went through the guest's MSI-X and MSI vectors.
        interrupts = vm.check("grep mgpu /proc/interrupts")
        assert "MSIX" in interrupts.upper() or "MSI-X" in interrupts.upper(), interrupts
        for served in (msix, msi):
            device = served.device
            assert device.engine.commands_executed == 8
            assert device.registers.get("INT_STATUS") == 0
            assert device.resources.resources, "the guest's resources live in device memory"
        # Unloading the driver frees its vectors; the device stays usable.
        vm.check("rmmod mgpu")
        assert vm.quit() == 0

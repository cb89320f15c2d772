"""A driver developer's session: a real guest runs while the operator steers the
device through the control socket (qemu.qmp's client).  The instance is created
over the socket and every injectable fault is observed by the guest itself: a
surprise removal (all ones), a slow fault (a first touch of an aperture page takes
the delay), a bit flip (the data reads back with that bit flipped), a DMA error
(DMA_STATUS ERROR, DMA_ERROR EIO), a dropped, a spurious and a delayed interrupt
(counted in /proc/interrupts, timed by mgpu-ring), a failed allocation (RES_STATUS
NO_MEMORY), a ring error (ring ERROR and ERROR_CODE) and an engine hang (mgpu-ring
times out on a BUSY ring); the guest resets the device itself and recovers."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from device.control.commands import Control
from device.control.manager import GpuServer
from device.control.qmp import ControlServer
from device.gpu import abi
from device.gpu.regs import table as regs
from device.harness.vm import GuestVM
from guest_images import Runtime, parse_bdfs, parse_results, pattern_bytes

pytestmark = pytest.mark.qemu
DEVICE_RESET = regs.BY_NAME["DEVICE_RESET"].offset
ID = regs.BY_NAME["ID"].offset
INT_STATUS = regs.BY_NAME["INT_STATUS"].offset
DMA_VECTOR = abi.INT_VECTORS[abi.IntBit.DMA]
FAULT_VECTOR = abi.INT_VECTORS[abi.IntBit.FAULT]  # nothing raises it here (sigbus policy)
SLOW = 1.5  # seconds: the injected slow fault
LATE = 2.0  # seconds: the injected interrupt delay


def event_names(client: QEMUMonitorProtocol) -> set[str]:
    return {str(e["event"]) for e in client.get_events(wait=False)}


def probe(vm: GuestVM, *args: object, ok: bool = True) -> dict[str, str]:
    """``mgpu-probe ARGS``'s results; with ``ok=False`` it must fail (exit 1)."""
    status, output = vm.run(f"mgpu-probe {' '.join(map(str, args))}")
    assert (status == 0) == ok, output
    return parse_results(output)


def interrupts(vm: GuestVM) -> dict[int, int]:
    """The guest kernel's interrupt count of each mgpu vector (/proc/interrupts)."""
    counts: dict[int, int] = {}
    for line in vm.check("sleep 0.3; cat /proc/interrupts").splitlines():
        fields = line.split()
        if not fields or fields[-1] != "mgpu":
            continue
        numbers = [int(f) for f in fields[1:] if f.isdigit()]
        hwirq = next(f for f in fields if f.endswith("-edge")).removesuffix("-edge")
        counts[int(hwirq) & 0x7FF] = sum(numbers)  # the MSI-X entry (low 11 bits)
    assert counts, "mgpu.ko requested no interrupts"
    return counts


def word(data: bytes, index: int) -> int:
    return int.from_bytes(data[4 * index : 4 * index + 4], "little")


def test_guest_driver_sees_injected_faults_and_recovers(
    runtime: Runtime, gpu_server: GpuServer, short_tmp: Path
) -> None:
    with ControlServer(short_tmp / "control.sock", Control(gpu_server, short_tmp)) as control:
        client = QEMUMonitorProtocol(str(control.path))
        client.connect()

        def inject(fault: str, **params: Any) -> None:
            client.cmd("inject-fault", name="dev0", fault=fault, **params)

        try:
            served: Any = client.cmd("instance-add", name="dev0", type="mgpu-64", mapping="fault")
            with GuestVM(runtime, short_tmp, vfio_user_sockets=[Path(served["socket"])]) as vm:
                vm.start()
                assert client.cmd("query-instances")[0]["client_connected"]  # type: ignore[index]
                (bdf,) = parse_bdfs(vm.check("mgpu-probe find"))
                vm.check("modprobe mgpu")
                # Surprise removal: the device fell off the bus, reads are all ones.
                inject("surprise-removal")
                assert probe(vm, "read", bdf, 0, f"{ID:#x}")["value"] == "0xffffffff"
                client.cmd("inject-clear", name="dev0")
                assert int(probe(vm, "read", bdf, 0, f"{ID:#x}")["value"], 16) == abi.ID_VALUE

                # Slow fault: the first touch of a placed page waits in the fault callback.
                handle = int(probe(vm, "res", bdf, "create", 65536)["handle"])
                offset = int(probe(vm, "res", bdf, "place", handle)["offset"], 0)
                inject("slow-fault", delay=SLOW, count=1)
                slow = probe(vm, "fill", bdf, 2, f"{offset:#x}", 4096, 0x5EED)
                fast = probe(vm, "fill", bdf, 2, f"{offset + 0x8000:#x}", 4096, 0x5EED)
                assert float(slow["elapsed_ns"]) >= SLOW * 1e9, slow
                assert float(fast["elapsed_ns"]) < SLOW * 1e9, fast

                # Bit flip: bit 3 of byte 5 of the resource; the guest reads it flipped.
                inject("bit-flip", handle=handle, offset=5, bit=3)
                expected = word(pattern_bytes(4096, 0x5EED), 1) ^ (1 << (8 + 3))
                assert int(probe(vm, "read", bdf, 2, f"{offset + 4:#x}")["value"], 16) == expected
                flipped = probe(vm, "check", bdf, 2, f"{offset:#x}", 4096, 0x5EED, ok=False)
                assert flipped["mismatches"] == "1", flipped

                # DMA error: the next bring-up DMA fails with EIO; its interrupt still comes.
                target = f"{offset + 0x4000:#x}"  # a page of the placed resource
                before = interrupts(vm)
                inject("dma-error", count=1)
                dma = probe(vm, "dma", bdf, "to-aperture", target, 4096, 7, ok=False)
                assert dma["status"] == str(int(abi.DmaStatus.ERROR)), dma
                assert dma["error"] == str(errno.EIO), dma
                after_error = interrupts(vm)
                assert after_error[DMA_VECTOR] == before[DMA_VECTOR] + 1
                # Interrupt dropped: the next DMA completes, but its interrupt never comes.
                inject("irq-drop", count=1)
                dma = probe(vm, "dma", bdf, "to-aperture", target, 4096, 7)
                assert dma["status"] == str(int(abi.DmaStatus.DONE)), dma
                after_drop = interrupts(vm)
                assert after_drop[DMA_VECTOR] == after_error[DMA_VECTOR], (after_error, after_drop)
                # Spurious interrupt: the FAULT vector fires with no operation, nothing pending.
                inject("irq-spurious", vector=FAULT_VECTOR)
                after_spurious = interrupts(vm)
                assert after_spurious[FAULT_VECTOR] == after_drop[FAULT_VECTOR] + 1
                assert after_spurious[DMA_VECTOR] == after_drop[DMA_VECTOR]
                int_status = int(probe(vm, "read", bdf, 0, f"{INT_STATUS:#x}")["value"], 16)
                assert not int_status & abi.IntBit.FAULT, hex(int_status)

                # Allocation failure: CREATE reports NO_MEMORY in RES_STATUS.
                inject("alloc-fail", count=1)
                failed = probe(vm, "res", bdf, "create", 4096, ok=False)
                assert failed["status"] == str(int(abi.ErrorCode.NO_MEMORY)), failed

                # Interrupt delayed: the fence interrupt comes LATE seconds late.
                inject("irq-delay", delay=LATE, count=1)
                late = parse_results(vm.check("mgpu-ring 0", timeout=120))
                assert late["fence"] == "42" and late["saxpy_ok"] == "1", late
                assert float(late["submit_to_interrupt_us"]) >= LATE * 1e6, late

                # Engine hang: the fence never comes; the ring stays BUSY.
                inject("engine-hang")
                status, output = vm.run("mgpu-ring 0 3000", timeout=120)
                assert status != 0 and "no fence interrupt" in output, output
                assert f"ring status {int(abi.RingStatus.BUSY)}" in output, output
                # The guest driver resets the device.
                vm.check(f"mgpu-probe write {bdf} 0 {DEVICE_RESET:#x} 1")
                # Ring error: the ring stops in ERROR with the injected ERROR_CODE.
                inject("ring-error", count=1, code="ENGINE_FAULT")
                status, output = vm.run("mgpu-ring 0 3000", timeout=120)
                assert status != 0 and "no fence interrupt" in output, output
                ring_error = int(abi.ErrorCode.ENGINE_FAULT)
                assert f"ring status {int(abi.RingStatus.ERROR)}, error {ring_error})" in output
                # Reset again, and the next submission works, its interrupt on time.
                vm.check(f"mgpu-probe write {bdf} 0 {DEVICE_RESET:#x} 1")
                result = parse_results(vm.check("mgpu-ring 0", timeout=120))
                assert result["fence"] == "42" and result["saxpy_ok"] == "1", result
                assert float(result["submit_to_interrupt_us"]) < LATE * 1e6, result
                assert {"CLIENT_CONNECTED", "DEVICE_RESET", "ENGINE_ERROR"} <= event_names(client)
                assert client.cmd("query-instances")[0]["injected"] == {}  # type: ignore[index]
                assert vm.quit() == 0
            client.cmd("instance-del", name="dev0")
        finally:
            client.close()

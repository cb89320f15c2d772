"""The hello module on a guest with two mgpu GPUs: build it, load it, check the log.

Everything here comes from mgpu's pytest plugin; there is no conftest.py.
"""

from __future__ import annotations

from pathlib import Path

from device.gpu.modes import DeniedPolicy, MappingMode
from device.harness.pytest_plugin import (
    GUEST_SHARE,
    CreateGuest,
    CreateInstance,
    FaultCursor,
    Kbuild,
    fault_log,
    kernel_problems,
    read_register,
)

MODULE = Path(__file__).resolve().parents[1] / "module"


def test_hello_builds_loads_and_counts_the_gpus(
    mgpu_kbuild: Kbuild, mgpu_share: Path, mgpu_vm: CreateGuest
) -> None:
    (ko,) = mgpu_kbuild(MODULE, mgpu_share)
    assert ko.name == "hello.ko"
    guest = mgpu_vm(2, share=mgpu_share)
    assert guest.qmp.cmd("query-status") == {"status": "running", "running": True}

    guest.check(f"insmod {GUEST_SHARE}/hello.ko")
    assert "hello: loaded, 2 mgpu GPU(s)" in guest.dmesg()
    guest.check("rmmod hello")
    assert "hello: goodbye" in guest.dmesg()
    assert kernel_problems(guest.dmesg()) == []

    status, output = guest.run("cat /proc/modules | grep -c hello")
    assert (status, output) == (1, "0")  # unloaded; grep's exit status comes back


def test_registers_and_fault_log_of_an_instance(
    mgpu_instance: CreateInstance, mgpu_vm: CreateGuest
) -> None:
    gpu = mgpu_instance("gpu0", mapping=MappingMode.FAULT, denied=DeniedPolicy.REPORT)
    guest = mgpu_vm([gpu])
    (bdf,) = guest.gpus()

    guest.check(f"mgpu-probe write {bdf} 0 0x8 0x600d")  # SCRATCH, through a trapped write
    assert read_register(gpu, "SCRATCH") == 0x600D

    faults = FaultCursor(fault_log(gpu))
    guest.check(f"mgpu-probe read {bdf} 2 0x30000")  # nothing allocated there
    (record,) = faults.new("reported")
    assert record.offset == 0x30000
    assert read_register(gpu, "FAULT_COUNT") >= 1

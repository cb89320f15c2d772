"""A driver developer's session: a real guest runs while the operator steers the
device through the control socket (qemu.qmp's client).  The instance is created
over the socket, the guest sees a surprise removal (all ones) and an engine hang
(mgpu-ring times out on a BUSY ring), resets the device itself and recovers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from device.control.commands import Control
from device.control.manager import GpuServer
from device.control.qmp import ControlServer
from device.gpu import registers as regs
from device.harness.vm import GuestVM
from guest_images import Runtime, parse_results

pytestmark = pytest.mark.qemu
DEVICE_RESET = regs.BY_NAME["DEVICE_RESET"].offset
ID = regs.BY_NAME["ID"].offset


def event_names(client: QEMUMonitorProtocol) -> set[str]:
    return {str(e["event"]) for e in client.get_events(wait=False)}


def test_guest_driver_sees_injected_faults_and_recovers(
    runtime: Runtime, gpu_server: GpuServer, short_tmp: Path
) -> None:
    with ControlServer(short_tmp / "control.sock", Control(gpu_server, short_tmp)) as control:
        client = QEMUMonitorProtocol(str(control.path))
        client.connect()
        try:
            served: Any = client.cmd("instance-add", name="dev0", type="mgpu-64")
            with GuestVM(runtime, short_tmp, vfio_user_sockets=[Path(served["socket"])]) as vm:
                vm.start()
                assert client.cmd("query-instances")[0]["client_connected"]  # type: ignore[index]
                (bdf,) = [v for k, v in parse_results(vm.check("mgpu-probe find")).items()]
                vm.check("modprobe mgpu")
                # Surprise removal: the device fell off the bus, reads are all ones.
                client.cmd("inject-fault", name="dev0", fault="surprise-removal")
                value = parse_results(vm.check(f"mgpu-probe read {bdf} 0 {ID:#x}"))["value"]
                assert value == "0xffffffff"
                client.cmd("inject-clear", name="dev0")
                value = parse_results(vm.check(f"mgpu-probe read {bdf} 0 {ID:#x}"))["value"]
                assert int(value, 16) == regs.ID_VALUE
                # Engine hang: the fence never comes; the ring stays BUSY.
                client.cmd("inject-fault", name="dev0", fault="engine-hang")
                status, output = vm.run("mgpu-ring 0", timeout=120)
                assert status != 0 and "no fence interrupt" in output, output
                assert f"ring status {int(regs.RingStatus.BUSY)}" in output, output
                # The guest driver resets the device, and its next submission works.
                vm.check(f"mgpu-probe write {bdf} 0 {DEVICE_RESET:#x} 1")
                result = parse_results(vm.check("mgpu-ring 0", timeout=120))
                assert result["fence"] == "42" and result["saxpy_ok"] == "1", result
                assert {"CLIENT_CONNECTED", "DEVICE_RESET"} <= event_names(client)
                assert vm.quit() == 0
            client.cmd("instance-del", name="dev0")
        finally:
            client.close()

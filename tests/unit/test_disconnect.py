"""A client killed with SIGKILL leaves nothing behind in the server: no fd, no mapping
of its memory, no thread; the device keeps its state and serves the next client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from device.gpu import abi
from device.gpu.instance.instance import GpuInstance
from device.gpu.regs import table as regs
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion
from device.vfio_user.server import Endpoint
from tests.helpers import wait_until
from tests.unit.conftest import ServeInstance

ROOT = Path(__file__).resolve().parents[2]

# A client that maps (sealed) fd-backed "guest RAM", wires 8 MSI-X eventfds, writes SCRATCH,
# then waits to be killed.
DOOMED_CLIENT = """
import os, sys, time
from device.vfio_user.client import VfioUserClient, create_guest_ram
client = VfioUserClient.connect(sys.argv[1])
ram = create_guest_ram("doomed-guest-ram", 4 << 20)
client.dma_map(0x100000, 4 << 20, fd=ram)
client.set_irq_eventfds(2, tuple(os.eventfd(0) for _ in range(8)))
client.write32(0, 0x8, 0xC0FFEE)
print("ready", flush=True)
time.sleep(60)
"""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapped(name: str) -> bool:
    return name in Path("/proc/self/maps").read_text()


@pytest.fixture
def endpoint(serve_instance: ServeInstance) -> Endpoint:
    return serve_instance(name="kill")


def test_sigkilled_client_leaks_nothing_and_device_state_survives(endpoint: Endpoint) -> None:
    fds_before = open_fds()
    threads_before = threading.active_count()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    doomed = subprocess.Popen(
        [sys.executable, "-c", DOOMED_CLIENT, str(endpoint.path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert doomed.stdout is not None
        assert doomed.stdout.readline().strip() == "ready"
        session = endpoint.session
        assert session is not None
        assert len(session.dma) == 1
        assert len(session.irqs.assigned(2)) == 8
        assert mapped("doomed-guest-ram")
        assert open_fds() >= fds_before + 9  # the connection and 8 eventfds (the RAM keeps none)
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        if doomed.stdout is not None:
            doomed.stdout.close()
    wait_until(lambda: endpoint.clients_served != 0, 10, "the server to drop the client", 0.02)
    assert endpoint.clients_served == 1
    assert endpoint.session is None
    assert open_fds() == fds_before
    assert not mapped("doomed-guest-ram")
    assert threading.active_count() == threads_before

    # The device kept its state, and the next client is served.
    device = endpoint.device
    assert isinstance(device, GpuInstance)
    assert device.dma is None and device.interrupts.lines is None
    with VfioUserClient.connect(endpoint.path) as client:
        assert client.read32(PciRegion.BAR0, regs.BY_NAME["SCRATCH"].offset) == 0xC0FFEE
        assert client.read32(PciRegion.BAR0, regs.BY_NAME["ID"].offset) == abi.ID_VALUE

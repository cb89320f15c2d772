"""A hostile driver cannot change a ring under a running command, free memory a command
still writes, or wedge the engine: resets and destruction fence it for real.

The engine is held in the middle of a command deterministically by putting the ring
and its data in guest memory without an fd: every access is a DMA_READ message to our
client, whose memory hook sends the hostile register writes (flagged No_reply, so no
reply can confuse the client) *before* it answers.  The server's socket thread
therefore handles them while the engine waits for that answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device.gpu import abi
from device.gpu.engine.commands import COMMAND_SIZE, Opcode, encode
from device.gpu.instance.instance import GpuInstance
from device.gpu.regs import table as regs
from device.vfio_user.client import BytearrayMemory, VfioUserClient
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.constants import Command, PciRegion
from device.vfio_user.server import Endpoint
from tests.helpers import wait_until

GUEST_BASE = 0x10_0000
GUEST_SIZE = 1 << 20
RING = GUEST_BASE
RING_SIZE = 4096
DATA = GUEST_BASE + 0x8000


def reg(name: str) -> int:
    return regs.BY_NAME[name].offset


class HookedMemory(BytearrayMemory):
    """Guest memory whose reads of one address first run a hook (once)."""

    def __init__(self) -> None:
        super().__init__(GUEST_BASE, GUEST_SIZE)
        self.hooks: dict[int, Callable[[], None]] = {}

    def read(self, address: int, length: int) -> bytes:
        hook = self.hooks.pop(address, None)
        if hook is not None:
            hook()
        return super().read(address, length)


class Rig:
    def __init__(self, device: GpuInstance, client: VfioUserClient, memory: HookedMemory):
        self.device, self.client, self.memory = device, client, memory
        self.tail = 0

    def write(self, name: str, value: int) -> None:
        self.client.write32(PciRegion.BAR0, reg(name), value)

    def read(self, name: str) -> int:
        return self.client.read32(PciRegion.BAR0, reg(name))

    def write_no_reply(self, name: str, value: int) -> None:
        """A register write the server handles in order but never answers."""
        payload = m.pack_region_access(reg(name), PciRegion.BAR0, 4, value.to_bytes(4, "little"))
        message = m.encode_message(
            0xFFFF, Command.REGION_WRITE, payload, reply=False, no_reply=True
        )
        self.client.send_raw(message)

    def enable_ring(self) -> None:
        self.write("CTX0_RING_BASE_LO", RING)
        self.write("CTX0_RING_SIZE", RING_SIZE)
        self.write("CTX0_RING_CONTROL", abi.RING_CONTROL_ENABLE)
        assert self.read("CTX0_RING_STATUS") == abi.RingStatus.IDLE

    def submit(self, *commands: bytes) -> int:
        """Write commands, ring the doorbell; returns the ring offset of the first."""
        first = self.tail
        for command in commands:
            self.memory.write(RING + self.tail, command)
            self.tail = (self.tail + COMMAND_SIZE) % RING_SIZE
        self.write("CTX0_RING_TAIL", self.tail)
        self.write("CTX0_DOORBELL", 1)
        return first

    def settle(self, what: str) -> None:
        """Poll (serving the device's DMA requests) until the ring has stopped moving."""

        def idle() -> bool:
            status = self.read("CTX0_RING_STATUS")
            return status != abi.RingStatus.BUSY and (
                status == abi.RingStatus.ERROR or self.read("CTX0_RING_HEAD") == self.tail
            )

        wait_until(idle, 10, what)

    def create(self, size: int) -> int:
        self.write("RES_SIZE_LO", size)
        self.write("RES_COMMAND", abi.ResourceCommand.CREATE)
        assert self.read("RES_STATUS") == 0
        return self.read("RES_HANDLE")

    def place(self, handle: int) -> int:
        self.write("RES_HANDLE", handle)
        self.write("RES_COMMAND", abi.ResourceCommand.PLACE)
        assert self.read("RES_STATUS") == 0
        return self.read("RES_OFFSET_LO")


@pytest.fixture
def rig(short_tmp: Path) -> Iterator[Rig]:
    device = GpuInstance("rings", aperture_size=1 << 20)
    endpoint = Endpoint(short_tmp / "gpu.sock", device, "rings")
    endpoint.start()
    memory = HookedMemory()
    client = VfioUserClient.connect(endpoint.path, timeout=10)
    client.guest_memory = memory
    client.dma_map(GUEST_BASE, GUEST_SIZE)  # no fd: every access is a message
    try:
        yield Rig(device, client, memory)
    finally:
        client.close()
        endpoint.stop()
        device.close()


def test_ring_base_and_size_are_read_only_while_the_ring_is_enabled(rig: Rig) -> None:
    rig.enable_ring()
    rig.write("CTX0_RING_SIZE", 0)
    rig.write("CTX0_RING_SIZE", 100)  # not a power of two: once spun the engine forever
    rig.write("CTX0_RING_BASE_LO", 0x1234_0000)
    assert rig.read("CTX0_RING_SIZE") == RING_SIZE
    assert rig.read("CTX0_RING_BASE_LO") == RING
    rig.submit(encode(Opcode.NOP), encode(Opcode.FENCE, value=7))
    rig.settle("the ring to run its commands")
    assert rig.read("CTX0_RING_HEAD") == 2 * COMMAND_SIZE
    assert rig.read("CTX0_FENCE_LO") == 7
    # Disabled, the geometry may change again, and the next enable latches it.
    rig.write("CTX0_RING_CONTROL", 0)
    rig.write("CTX0_RING_SIZE", 2 * RING_SIZE)
    assert rig.read("CTX0_RING_SIZE") == 2 * RING_SIZE


def test_ring_size_written_in_the_middle_of_a_command_changes_nothing(rig: Rig) -> None:
    rig.enable_ring()
    # While the engine waits for the command's own DMA_READ, the driver sets RING_SIZE 0
    # (this once divided by zero and killed the engine thread for good).
    rig.memory.hooks[RING] = lambda: rig.write_no_reply("CTX0_RING_SIZE", 0)
    rig.submit(encode(Opcode.FENCE, value=1))
    rig.settle("the first command")
    assert rig.read("CTX0_RING_STATUS") == abi.RingStatus.IDLE
    assert rig.read("CTX0_RING_HEAD") == COMMAND_SIZE
    # The engine is alive: later commands run, and HEAD stays a multiple of 64.
    rig.memory.hooks[RING + COMMAND_SIZE] = lambda: rig.write_no_reply("CTX0_RING_SIZE", 100)
    rig.submit(encode(Opcode.NOP), encode(Opcode.FENCE, value=2))
    rig.settle("the later commands")
    assert rig.read("CTX0_FENCE_LO") == 2
    assert rig.read("CTX0_RING_HEAD") == 3 * COMMAND_SIZE


def test_destroy_during_a_command_frees_the_memory_only_after_it(rig: Rig) -> None:
    rig.enable_ring()
    victim = rig.create(4096)
    rig.memory.write(DATA, b"\xee" * 4096)

    def destroy_and_reallocate() -> None:  # while the engine waits for the data
        rig.write_no_reply("RES_HANDLE", victim)
        rig.write_no_reply("RES_COMMAND", abi.ResourceCommand.DESTROY)
        rig.write_no_reply("RES_SIZE_LO", 4096)
        rig.write_no_reply("RES_COMMAND", abi.ResourceCommand.CREATE)

    rig.memory.hooks[DATA] = destroy_and_reallocate
    rig.submit(encode(Opcode.WRITE_RESOURCE, guest_addr=DATA, handle=victim, length=4096))
    rig.settle("the write into the destroyed resource")
    newcomer = rig.read("RES_HANDLE")
    assert newcomer != victim and rig.read("RESOURCE_COUNT") == 1
    offset = rig.place(newcomer)
    # The command that started before the DESTROY wrote into memory nobody else has:
    # the new resource is zero, and the old memory went back to the pool afterwards.
    assert bytes(rig.device.aperture[offset : offset + 4096]) == bytes(4096)
    assert rig.device.resources.free_bytes == rig.device.aperture_size - 4096
    assert b"\xee" not in bytes(rig.device.aperture)  # scrubbed once the command ended


def test_a_reset_during_message_dma_fences_the_engine_and_loses_nothing_later(rig: Rig) -> None:
    rig.enable_ring()
    target = rig.create(4096)
    rig.memory.write(DATA, b"\xdd" * 4096)
    rig.memory.hooks[DATA] = lambda: rig.write_no_reply("DEVICE_RESET", 1)
    started = time.monotonic()
    rig.submit(encode(Opcode.WRITE_RESOURCE, guest_addr=DATA, handle=target, length=4096))
    # The reset cancels the engine's DMA_READ instead of waiting for its answer (which
    # the client sends only after the socket thread is done with the reset).
    # (Each register read also lets the client answer the device's DMA requests.)
    wait_until(lambda: rig.read("ID") > 0 and rig.device.resets == 1, 10, "the reset")
    assert rig.read("CTX0_RING_STATUS") == abi.RingStatus.STOPPED
    assert rig.read("RESOURCE_COUNT") == 0
    with rig.device.engine.fenced():  # whatever the engine still does has ended
        pass
    assert time.monotonic() - started < 1.5, "the reset waited for the client"
    assert b"\xdd" not in bytes(rig.device.aperture), "a stale command wrote after reset"
    # The instance works after it.
    rig.tail = 0
    rig.enable_ring()
    rig.submit(encode(Opcode.FENCE, value=9))
    rig.settle("a command after the reset")
    assert rig.read("CTX0_FENCE_LO") == 9


def test_a_bug_in_a_command_fails_it_and_the_engine_keeps_serving(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.enable_ring()
    handle = rig.create(4096)
    real_pin = rig.device.pin_resource
    calls: list[int] = []

    def buggy_pin(*args: int) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("an engine bug")
        return real_pin(*args)

    monkeypatch.setattr(rig.device, "pin_resource", buggy_pin)
    rig.submit(encode(Opcode.FILL, handle=handle, length=4096, value=0x01010101))
    rig.settle("the buggy command")
    assert rig.read("CTX0_RING_STATUS") == abi.RingStatus.ERROR
    assert rig.read("ERROR_CODE") == abi.ErrorCode.ENGINE_FAULT
    rig.write("CTX0_RING_CONTROL", 0)
    rig.tail = 0
    rig.enable_ring()
    rig.submit(encode(Opcode.FILL, handle=handle, length=4096, value=0x02020202))
    rig.settle("a command after the bug")
    assert rig.read("CTX0_RING_STATUS") == abi.RingStatus.IDLE


def test_closing_an_instance_does_not_wait_for_a_client_that_never_answers(
    short_tmp: Path,
) -> None:
    device = GpuInstance("stuck", aperture_size=1 << 20)
    endpoint = Endpoint(short_tmp / "gpu.sock", device, "stuck")
    endpoint.start()
    client = VfioUserClient.connect(endpoint.path, timeout=10)
    memory = BytearrayMemory(GUEST_BASE, GUEST_SIZE)
    client.guest_memory = memory
    try:
        client.dma_map(GUEST_BASE, GUEST_SIZE)
        rig = Rig(device, client, HookedMemory())
        rig.enable_ring()
        memory.write(RING, encode(Opcode.NOP))
        # From here the client never reads its socket: the engine's DMA_READ of the
        # command waits for an answer that never comes.
        rig.write_no_reply("CTX0_RING_TAIL", COMMAND_SIZE)
        rig.write_no_reply("CTX0_DOORBELL", 1)
        busy = abi.RingStatus.BUSY
        wait_until(lambda: device.registers.get("CTX0_RING_STATUS") == busy, 5, "BUSY")
        physical = device.physical
        closer = threading.Thread(target=device.close)
        started = time.monotonic()
        closer.start()
        closer.join(8)
        assert not closer.is_alive(), "close() waited for the client"
        assert time.monotonic() - started < 5
        assert not device.engine._thread.is_alive()
        assert "stuck" not in physical.instances, "memory released once nothing can touch it"
    finally:
        client.close()
        endpoint.stop()
        device.close()

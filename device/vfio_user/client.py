"""A synchronous vfio-user client: drives a server without QEMU (tests, tools, benches).

It speaks the same wire format as QEMU, including the two-step region-info request
and fd passing, and raises ``VfioUserError`` with the server's errno on error replies.

Like QEMU, it answers the server's own requests (DMA_READ/DMA_WRITE for memory it
mapped without an fd) from ``guest_memory`` whenever it reads the socket: while it
waits for a reply, and in ``poll()``.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import socket
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Protocol

from device.errors import VfioUserError
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.codec import Frame, close_fds
from device.vfio_user.protocol.constants import Command, DmaMapFlags, IrqSetFlags
from device.vfio_user.transport import Connection

DEFAULT_CLIENT_CAPABILITIES: dict[str, object] = {
    "max_msg_fds": 16,
    "max_data_xfer_size": 1048576,
    "pgsizes": 4096,
    "max_dma_maps": 65535,
}


# QEMU's memory-backend-memfd seals its RAM the same way (seal=on by default).  The
# server maps only memfds that cannot shrink, and serves any other fd by messages.
GUEST_RAM_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def create_guest_ram(name: str, size: int) -> int:
    """A memfd of ``size`` bytes sealed like QEMU's guest RAM, for fd-backed DMA_MAP."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, GUEST_RAM_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class GuestMemory(Protocol):
    """Memory the client lets the server reach by DMA_READ/DMA_WRITE."""

    def read(self, address: int, length: int) -> bytes: ...
    def write(self, address: int, data: bytes) -> None: ...


class BytearrayMemory:
    """Guest memory as a bytearray at a base address; out-of-range access is EFAULT."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.data = bytearray(size)

    def _offset(self, address: int, length: int) -> int:
        offset = address - self.base
        if offset < 0 or offset + length > len(self.data):
            raise VfioUserError(errno.EFAULT, f"{address:#x}+{length} outside guest memory")
        return offset

    def read(self, address: int, length: int) -> bytes:
        offset = self._offset(address, length)
        return bytes(self.data[offset : offset + length])

    def write(self, address: int, data: bytes) -> None:
        offset = self._offset(address, len(data))
        self.data[offset : offset + len(data)] = data


class VfioUserClient:
    def __init__(self, sock: socket.socket, guest_memory: GuestMemory | None = None) -> None:
        self.connection = Connection(sock)
        self._ids = itertools.count(1)
        self._frames: deque[Frame] = deque()
        self.server_capabilities: dict[str, object] = {}
        self.guest_memory = guest_memory
        self.server_requests_served = 0

    @classmethod
    def connect(
        cls, path: Path | str, *, negotiate: bool = True, timeout: float | None = 10.0
    ) -> VfioUserClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        client = cls(sock)
        if negotiate:
            client.version()
        return client

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ raw exchange

    def send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        self.connection.send(data, fds)

    def receive(self) -> Frame:
        """The next message from the server that is not a request of its own."""
        while True:
            if self._frames:
                frame = self._frames.popleft()
            else:
                frames = self.connection.receive()
                frame = frames[0]
                if len(frames) > 1:
                    self._frames.extend(frames[1:])
            if frame.header.is_reply:
                return frame
            self._serve_request(frame)

    def poll(self, timeout: float) -> int:
        """Answer server requests arriving within ``timeout`` seconds; returns how many."""
        served_before = self.server_requests_served
        deadline = time.monotonic() + timeout
        old_timeout = self.connection.sock.gettimeout()
        try:
            while (left := deadline - time.monotonic()) > 0:
                if not self._frames:
                    self.connection.sock.settimeout(left)
                    try:
                        self._frames.extend(self.connection.receive())
                    except (TimeoutError, BlockingIOError):
                        break
                frame = self._frames.popleft()
                if frame.header.is_reply:
                    close_fds(frame.fds)
                    raise RuntimeError(f"unexpected reply id {frame.header.msg_id} while polling")
                self._serve_request(frame)
        finally:
            self.connection.sock.settimeout(old_timeout)
        return self.server_requests_served - served_before

    def _serve_request(self, frame: Frame) -> None:
        header = frame.header
        close_fds(frame.fds)
        payload, error = b"", 0
        try:
            if frame.fds or self.guest_memory is None:
                raise VfioUserError(errno.EINVAL, "no guest memory to serve DMA from")
            access = m.DmaAccess.unpack(frame.payload)
            if header.command == Command.DMA_READ:
                data = self.guest_memory.read(access.address, access.count)
                payload = m.DmaAccess(access.address, access.count, data).pack()
            elif header.command == Command.DMA_WRITE:
                if len(access.data) != access.count:
                    raise VfioUserError(errno.EINVAL, "DMA_WRITE count does not match its data")
                self.guest_memory.write(access.address, access.data)
            else:
                raise VfioUserError(errno.ENOSYS, f"server sent command {header.command}")
        except VfioUserError as exc:
            payload, error = b"", exc.errno
        except Exception:  # a malformed request must not kill the client either
            payload, error = b"", errno.EINVAL
        self.server_requests_served += 1
        if not header.no_reply:
            self.send_raw(
                m.encode_message(header.msg_id, header.command, payload, reply=True, error=error)
            )

    def request(self, command: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> Frame:
        """Send a command and return its reply; error replies raise VfioUserError."""
        msg_id = next(self._ids) & 0xFFFF
        self.connection.send(m.encode_message(msg_id, command, payload, reply=False), fds)
        reply = self.receive()
        if reply.header.msg_id != msg_id:
            close_fds(reply.fds)
            raise RuntimeError(f"reply id {reply.header.msg_id} does not answer {msg_id}")
        if reply.header.is_error:
            close_fds(reply.fds)
            raise VfioUserError(reply.header.error, f"{Command(command).name} failed")
        return reply

    # ------------------------------------------------------------------ commands

    def version(self, capabilities: dict[str, object] | None = None) -> m.Version:
        caps = DEFAULT_CLIENT_CAPABILITIES if capabilities is None else capabilities
        reply = self.request(Command.VERSION, m.Version(0, 0, caps).pack())
        version = m.Version.unpack(reply.payload, reply.fds)
        self.server_capabilities = version.capabilities
        return version

    def device_info(self) -> m.DeviceInfo:
        reply = self.request(Command.DEVICE_GET_INFO, m.DeviceInfoRequest(16).pack())
        return m.DeviceInfo.unpack(reply.payload, reply.fds)

    def region_info(self, index: int) -> tuple[m.RegionInfo, int | None]:
        """Region info with its capabilities, asking twice like QEMU; returns the fd too."""
        argsz = m.REGION_INFO_SIZE
        for _ in range(2):
            payload = m.RegionInfoRequest(argsz, index).pack()
            payload += bytes(argsz - len(payload))
            reply = self.request(Command.DEVICE_GET_REGION_INFO, payload)
            info, wanted = m.RegionInfo.unpack(reply.payload)
            if wanted <= argsz:
                if len(reply.fds) > 1:
                    close_fds(reply.fds)
                    raise RuntimeError("region info reply with more than one fd")
                return info, reply.fds[0] if reply.fds else None
            close_fds(reply.fds)
            argsz = wanted
        raise RuntimeError(f"region {index}: server keeps asking for a larger argsz")

    def irq_info(self, index: int) -> m.IrqInfo:
        reply = self.request(Command.DEVICE_GET_IRQ_INFO, m.IrqInfoRequest(16, index).pack())
        return m.IrqInfo.unpack(reply.payload, reply.fds)

    def set_irqs(
        self,
        index: int,
        flags: int,
        start: int = 0,
        count: int = 0,
        data: bytes = b"",
        fds: tuple[int, ...] = (),
    ) -> None:
        self.request(
            Command.DEVICE_SET_IRQS, m.SetIrqs(flags, index, start, count, data).pack(), fds
        )

    def set_irq_eventfds(self, index: int, fds: tuple[int, ...], start: int = 0) -> None:
        flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
        self.set_irqs(index, flags, start, len(fds), fds=fds)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.request(Command.REGION_READ, m.pack_region_access(offset, region, count))
        return m.parse_region_access(reply.payload, reply.fds, with_data=True)[3]

    def region_write(self, region: int, offset: int, data: bytes) -> None:
        self.request(Command.REGION_WRITE, m.pack_region_access(offset, region, len(data), data))

    def read32(self, region: int, offset: int) -> int:
        return int.from_bytes(self.region_read(region, offset, 4), "little")

    def write32(self, region: int, offset: int, value: int) -> None:
        self.region_write(region, offset, value.to_bytes(4, "little"))

    def dma_map(
        self,
        address: int,
        size: int,
        fd: int | None = None,
        offset: int = 0,
        flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE,
    ) -> None:
        payload = m.DmaMap(32, flags, offset, address, size).pack()
        self.request(Command.DMA_MAP, payload, (fd,) if fd is not None else ())

    def dma_unmap(self, address: int, size: int, flags: int = 0) -> None:
        self.request(Command.DMA_UNMAP, m.DmaUnmap(24, flags, address, size).pack())

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET)

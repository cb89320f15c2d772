"""Serve one aperture file on a private FUSE mount, so first touches become callbacks.

Theory of operation.  ``FuseAperture.start`` opens /dev/fuse, mounts a filesystem on a
temporary directory, starts the serving threads, opens the one file it holds (the
aperture) and detaches the mount at once: the open file keeps the filesystem alive,
nothing is left in the mount table, and when this process dies the kernel tears it all
down.  The open fd is what the vfio-user server hands QEMU for BAR2.

The kernel then sends READ for every page the first time anything maps it: that is the
fault callback, answered with the page's data or an error (SIGBUS for the toucher).
Dirty pages come back as WRITE (writeback).  ``invalidate`` revokes: it writes back
dirty pages, drops them and unmaps them from every process, so the next touch faults
again.  It must never run on a serving thread, which has to be free to take the
WRITEs that the revocation itself causes; several threads serve so that a slow fault
never holds up the others.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import Protocol

from device.errors import SetupError
from device.fuse import granularity
from device.fuse import protocol as p

log = logging.getLogger(__name__)

FILE_INODE = 2
FILE_NAME = b"aperture"
PROBE_INODE = 3  # the scratch file of the page-cache self-test (granularity.py)
PROBE_NAME = b"page-cache-probe"
MAX_WRITE = 1024 * 1024
BUFFER_SIZE = MAX_WRITE + 64 * 1024
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2

_FILE = p.S_IFREG | 0o600
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

# A request handler: (unique, nodeid, body after the header) -> the reply.
Handler = Callable[[int, int, memoryview], bytes | None]


class FuseUnavailable(SetupError):
    """A FUSE mount cannot be made here; the message says why and what to do."""


def _mount_as_root(mountpoint: str, max_read: int) -> int:
    try:
        fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise FuseUnavailable(f"cannot open /dev/fuse: {exc.strerror}") from None
    options = (
        f"fd={fuse_fd},rootmode=40000,user_id=0,group_id=0,allow_other,max_read={max_read}"
    ).encode()
    if _libc.mount(b"mgpu", mountpoint.encode(), b"fuse.mgpu", MS_NOSUID | MS_NODEV, options) != 0:
        error = ctypes.get_errno()
        os.close(fuse_fd)
        raise FuseUnavailable(f"mount of the FUSE aperture failed: {os.strerror(error)}")
    return fuse_fd


def _mount_with_fusermount(mountpoint: str, max_read: int) -> int:
    """Without root, the setuid fusermount3 mounts and hands us the /dev/fuse fd back
    over a socket (libfuse's _FUSE_COMMFD protocol)."""
    fusermount = shutil.which("fusermount3")
    if fusermount is None:
        raise FuseUnavailable(
            "fault mode without root needs fusermount3: apt-get install "
            "fuse3, or run as root, or use the trap or static mode"
        )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        result = subprocess.run(
            [fusermount, "-o", f"fsname=mgpu,subtype=mgpu,max_read={max_read}", "--", mountpoint],
            env=env,
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise FuseUnavailable(f"fusermount3 could not mount: {result.stderr.strip()}")
        _, ancillary, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(4))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fuse_fd = int.from_bytes(data[:4], "little")
            os.set_inheritable(fuse_fd, False)
            return fuse_fd
    raise FuseUnavailable("fusermount3 mounted but sent no /dev/fuse descriptor")


def _detach(mountpoint: str, privileged: bool) -> None:
    """Lazily unmount: the open aperture file keeps the filesystem alive, unlisted."""
    if privileged:
        _libc.umount2(mountpoint.encode(), MNT_DETACH)
    else:
        fusermount = shutil.which("fusermount3")
        if fusermount:
            subprocess.run(
                [fusermount, "-u", "-z", "--", mountpoint], capture_output=True, timeout=30
            )


Reply = Callable[[bytes | int], None]  # answers one READ later: data, or an errno


class ApertureBackend(Protocol):
    """The owner of the file: decides what a fault gets, and takes written-back data."""

    def fault(self, offset: int, length: int, later: Reply) -> bytes | int | None:
        """Data for [offset, offset+length), a positive errno to refuse, or None: the
        backend calls ``later`` exactly once, from any thread (a *parked* fault: the
        serving thread is free again meanwhile)."""

    def writeback(self, offset: int, data: bytes) -> None: ...


class FuseAperture:
    def __init__(
        self, name: str, size: int, backend: ApertureBackend, threads: int = 3,
        pin_pages: bool | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.size = size
        self.backend = backend
        self.thread_count = threads
        # Page-cache granularity (granularity.py): measured at mount; 4 KiB folios are
        # pinned (one-page reads and writes) if the kernel gives larger ones.  None:
        # pin only then; True: always (tests); False: never.
        self.pin_pages = pin_pages
        self.io_size = MAX_WRITE  # max_read, max_write and max_pages in bytes
        self.granularity = 0  # bytes, as measured at mount
        self.unpinned_granularity = 0  # what the first mount measured, before any pin
        self._probe = granularity.Probe()
        self.fuse_fd = -1
        self.file_fd = -1
        self.requests = 0
        self.connection: int | None = None  # the kernel's id: /sys/fs/fuse/connections/N
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._handlers: dict[int, Handler] = {
            p.Opcode.READ: self._read,
            p.Opcode.WRITE: self._write,
            p.Opcode.INIT: self._init,
            p.Opcode.LOOKUP: self._lookup,
            p.Opcode.GETATTR: self._getattr,
            p.Opcode.OPEN: self._open,
            p.Opcode.OPENDIR: self._open,
            p.Opcode.RELEASE: self._ok,
            p.Opcode.RELEASEDIR: self._ok,
            p.Opcode.FLUSH: self._ok,
            p.Opcode.FSYNC: self._ok,
            p.Opcode.DESTROY: self._ok,
            p.Opcode.READDIR: self._ok,
            p.Opcode.STATFS: self._statfs,
            p.Opcode.SETATTR: self._refuse,
        }  # anything else: ENOSYS

    # ------------------------------------------------------------------ lifecycle

    @property
    def pinned(self) -> bool:
        return self.io_size == granularity.PAGE

    def start(self) -> int:
        """Mount, serve, open the aperture file, measure the page-cache granularity
        (remounting with 4 KiB pinned if it is larger), detach; returns the file's fd."""
        if self.pin_pages:
            self.io_size = granularity.PAGE
        self._start()
        self.unpinned_granularity = self.granularity
        if self.granularity > granularity.PAGE and self.pin_pages is None:
            log.warning(
                "%s: this kernel caches FUSE files in %d-byte folios; remounting with "
                "4 KiB pinned (max_pages 1, max_read/max_write 4 KiB): faults stay "
                "page-granular, sequential first touches cost one READ per page",
                self.name, self.granularity,
            )  # fmt: skip
            self.close()
            self.io_size = granularity.PAGE
            self._start()
        if self.granularity > granularity.PAGE and self.pin_pages is not False:
            seen = self.granularity
            self.close()
            raise FuseUnavailable(
                f"the kernel caches FUSE files in {seen}-byte folios even with one-page "
                "reads pinned: fault mode cannot validate single pages here; use trap mode"
            )
        log.info(
            "%s: FUSE page-cache granularity %d bytes%s", self.name, self.granularity,
            " (4 KiB pinned)" if self.pinned else "",
        )  # fmt: skip
        return self.file_fd

    def _start(self) -> None:
        mountpoint = tempfile.mkdtemp(prefix=f"mgpu-{self.name}-")
        privileged = os.geteuid() == 0
        self._stopping = False
        self._probe = granularity.Probe()
        mount = _mount_as_root if privileged else _mount_with_fusermount
        try:
            self.fuse_fd = mount(mountpoint, self.io_size)
            for n in range(self.thread_count):
                thread = threading.Thread(
                    target=self._serve, name=f"{self.name}-fuse{n}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            self.file_fd = os.open(
                os.path.join(mountpoint, FILE_NAME.decode()), os.O_RDWR | os.O_CLOEXEC
            )
            self.connection = os.minor(os.fstat(self.file_fd).st_dev)
            probe_path = os.path.join(mountpoint, PROBE_NAME.decode())
            self.granularity = granularity.measure(probe_path, self._probe)
        except BaseException:
            self.close()
            raise
        finally:
            _detach(mountpoint, privileged)
            shutil.rmtree(mountpoint, ignore_errors=True)

    def abort(self) -> None:
        """Abort the connection: every waiter on it (a stuck QEMU too) gets an error
        instead of hanging in D state.  Needs fusectl, which this mounts if missing
        (as root; without root, closing the connection has to do)."""
        connection = self.connection
        if connection is None or self.fuse_fd < 0 or os.geteuid() != 0:
            return
        control = "/sys/fs/fuse/connections"
        if not os.path.exists(f"{control}/{connection}"):
            _libc.mount(b"fusectl", control.encode(), b"fusectl", 0, None)
        try:
            with open(f"{control}/{connection}/abort", "w") as handle:
                handle.write("1")
        except OSError as exc:
            log.warning("%s: cannot abort FUSE connection %s: %s", self.name, connection, exc)

    def close(self) -> None:
        """Abort the connection and close everything.  Aborting is what wakes the
        serving threads (a close does not interrupt their reads), and any process that
        still holds the file (a QEMU still attached) gets errors, never stale data."""
        self._stopping = True
        if self._threads:
            self.abort()
        if self.file_fd >= 0:
            os.close(self.file_fd)
            self.file_fd = -1
        if self.fuse_fd >= 0:
            fd, self.fuse_fd = self.fuse_fd, -1
            os.close(fd)  # serving threads get ENODEV/EBADF and stop
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()

    # ------------------------------------------------------------------ revocation

    def invalidate(self, offset: int, length: int) -> None:
        """Write back, drop and unmap [offset, offset+length) in every process."""
        if self.fuse_fd < 0 or length <= 0:
            return
        if threading.current_thread() in self._threads:
            raise RuntimeError("invalidate from a FUSE serving thread would deadlock")
        try:
            os.write(self.fuse_fd, p.inval_inode(FILE_INODE, offset, length))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                raise

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        buffer = bytearray(BUFFER_SIZE)
        view = memoryview(buffer)
        while not self._stopping:
            fd = self.fuse_fd
            if fd < 0:
                return
            try:
                size = os.readv(fd, [buffer])
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # interrupted request: nothing to answer
                return  # ENODEV (unmounted, aborted) or EBADF (closed)
            if size < p.IN_HEADER.size:
                continue
            self.requests += 1
            answer = self._handle(view[:size])
            if answer is not None:
                try:
                    os.write(fd, answer)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                        log.warning("%s: FUSE reply failed: %s", self.name, exc)

    def _handle(self, request: memoryview) -> bytes | None:
        _len, opcode, unique, nodeid, *_ = p.IN_HEADER.unpack_from(request)
        body = request[p.IN_HEADER.size :]
        if opcode in p.NO_REPLY:
            return None
        try:
            return self._dispatch(opcode, unique, nodeid, body)
        except Exception:
            log.exception("%s: FUSE request %d failed", self.name, opcode)
            return p.reply(unique, error=errno.EIO)

    def _dispatch(self, opcode: int, unique: int, nodeid: int, body: memoryview) -> bytes | None:
        handler = self._handlers.get(opcode)
        if handler is None:
            return p.reply(unique, error=errno.ENOSYS)
        return handler(unique, nodeid, body)

    # One handler per opcode, keyed in ``_handlers``; READ (a fault) and WRITE (a
    # writeback) are the hot ones.

    def _read(self, unique: int, nodeid: int, body: memoryview) -> bytes | None:
        _fh, offset, size, *_ = p.READ_IN.unpack_from(body)
        if nodeid == PROBE_INODE:
            answer = self._probe.read(offset, size)
            return (
                p.reply(unique, error=answer)
                if isinstance(answer, int)
                else p.reply(unique, answer)
            )
        size = max(0, min(size, self.size - offset))
        if not size:
            return p.reply(unique, b"")
        data = self.backend.fault(offset, size, lambda answer: self._answer(unique, answer))
        if data is None:
            return None  # parked: answered later through _answer
        if isinstance(data, int):
            return p.reply(unique, error=data)
        return p.reply(unique, data)

    def _answer(self, unique: int, data: bytes | int) -> None:
        """The late reply to a parked READ."""
        fd = self.fuse_fd
        if fd < 0:
            return
        message = p.reply(unique, error=data) if isinstance(data, int) else p.reply(unique, data)
        try:
            os.write(fd, message)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.warning("%s: late FUSE reply failed: %s", self.name, exc)

    def _write(self, unique: int, nodeid: int, body: memoryview) -> bytes:
        _fh, offset, size, *_ = p.WRITE_IN.unpack_from(body)
        if nodeid == PROBE_INODE:
            return p.reply(unique, p.WRITE_OUT.pack(size, 0))  # scratch: nothing kept
        data = bytes(body[p.WRITE_IN.size : p.WRITE_IN.size + size])
        if offset + size > self.size:
            return p.reply(unique, error=errno.EFBIG)
        self.backend.writeback(offset, data)
        return p.reply(unique, p.WRITE_OUT.pack(size, 0))

    def _init(self, unique: int, _nodeid: int, body: memoryview) -> bytes:
        major, _minor, _readahead, _flags = p.INIT_IN.unpack_from(body)
        if major != p.KERNEL_MAJOR:
            return p.reply(unique, error=errno.EPROTO)
        return p.reply(unique, p.init_out(self.io_size, self.io_size // granularity.PAGE))

    def _lookup(self, unique: int, nodeid: int, body: memoryview) -> bytes:
        name = bytes(body).split(b"\0", 1)[0]
        if nodeid == p.ROOT_INODE and name == FILE_NAME:
            return p.reply(unique, p.entry_out(FILE_INODE, self.size, p.S_IFREG | 0o600))
        if nodeid == p.ROOT_INODE and name == PROBE_NAME:
            return p.reply(unique, p.entry_out(PROBE_INODE, granularity.PROBE_SIZE, _FILE))
        return p.reply(unique, error=errno.ENOENT)

    def _getattr(self, unique: int, nodeid: int, _body: memoryview) -> bytes:
        if nodeid == p.ROOT_INODE:
            return p.reply(unique, p.attr_out(p.ROOT_INODE, 0, p.S_IFDIR | 0o700))
        if nodeid == PROBE_INODE:
            return p.reply(unique, p.attr_out(PROBE_INODE, granularity.PROBE_SIZE, _FILE))
        return p.reply(unique, p.attr_out(FILE_INODE, self.size, _FILE))

    def _open(self, unique: int, _nodeid: int, _body: memoryview) -> bytes:
        # KEEP_CACHE: an open must not drop pages other processes have mapped.
        return p.reply(unique, p.OPEN_OUT.pack(0, p.FOPEN_KEEP_CACHE | p.FOPEN_NOFLUSH, 0))

    def _ok(self, unique: int, _nodeid: int, _body: memoryview) -> bytes:
        return p.reply(unique)

    def _statfs(self, unique: int, _nodeid: int, _body: memoryview) -> bytes:
        return p.reply(unique, p.KSTATFS.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0))

    def _refuse(self, unique: int, _nodeid: int, _body: memoryview) -> bytes:
        return p.reply(unique, error=errno.EPERM)

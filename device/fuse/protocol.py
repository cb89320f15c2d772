"""The FUSE kernel protocol (linux/fuse.h), as much of it as a one-file filesystem
needs: structures, opcodes and their encodings.  Bytes in, tuples out; no I/O."""

from __future__ import annotations

import enum
import struct

KERNEL_MAJOR = 7
OUR_MINOR = 31  # what we speak; the kernel adapts to the lower of the two

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (flags2 follows, ignored)
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
# time_gran, max_pages, map_alignment, flags2, max_stack_depth, request_timeout, unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
# ino, size, blocks, a/m/ctime, their nsecs, mode, nlink, uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy (+ ATTR)
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs (+ ATTR)
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII24x")
INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino, offset, length

assert INIT_OUT.size == 64 and ATTR.size == 88 and READ_IN.size == 40


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    GETXATTR = 22
    LISTXATTR = 23
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    ACCESS = 34
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    STATX = 52


NO_REPLY = {Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT}

# INIT flags
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
MAX_PAGES = 1 << 22
# OPEN reply flags
FOPEN_KEEP_CACHE = 1 << 1  # without it, every open drops every cached (mapped) page
FOPEN_NOFLUSH = 1 << 5
# notification codes (in the error field of an unsolicited message)
NOTIFY_INVAL_INODE = 2

S_IFDIR = 0o040000
S_IFREG = 0o100000
ROOT_INODE = 1


def reply(unique: int, payload: bytes = b"", error: int = 0) -> bytes:
    """A reply; ``error`` is a positive errno (sent negated, as the kernel wants)."""
    if error:
        return OUT_HEADER.pack(OUT_HEADER.size, -error, unique)
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def attr(ino: int, size: int, mode: int) -> bytes:
    nlink = 2 if mode & S_IFDIR else 1
    return ATTR.pack(
        ino, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0
    )


def attr_out(ino: int, size: int, mode: int) -> bytes:
    return ATTR_OUT.pack(3600, 0, 0) + attr(ino, size, mode)


def entry_out(ino: int, size: int, mode: int) -> bytes:
    return ENTRY_OUT.pack(ino, 0, 3600, 3600, 0, 0) + attr(ino, size, mode)


def init_out(max_write: int, max_pages: int) -> bytes:
    flags = ASYNC_READ | BIG_WRITES | MAX_PAGES
    # max_readahead 0: a first touch asks for the touched page only (MADV_HUGEPAGE aside).
    return INIT_OUT.pack(
        KERNEL_MAJOR, OUR_MINOR, 0, flags, 16, 12, max_write, 1, max_pages, 0, 0, 0, 0
    )


def inval_inode(ino: int, offset: int, length: int) -> bytes:
    body = INVAL_INODE_OUT.pack(ino, offset, length)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE, 0) + body

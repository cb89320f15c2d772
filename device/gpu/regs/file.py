"""BAR0 as the guest sees it: register values, and writes dispatched to their actions.

The table in ``regs/table.py`` says what each register is; this module stores the
values and routes accesses.  A write to a register whose ``on_write`` is NONE stores
the value (read/write registers) or is dropped (read-only, write-only, unassigned);
any other action goes to the handler the owner registered for it, which decides what
to store.  Reads of registers with an ``on_read`` are computed by the owner's reader.
Any access width is accepted and split into the 32-bit registers it covers, in
address order.  The owner holds its lock around ``write`` and slow reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from device.gpu.regs import table as regs
from device.gpu.regs.table import ReadAction, Register, WriteAction

WriteHandler = Callable[[Register, int], None]  # (register, the new 32-bit value)
ReadHandler = Callable[[], int]  # a computed (up to 64-bit) value


class RegisterFile:
    def __init__(
        self,
        writers: Mapping[WriteAction, WriteHandler],
        readers: Mapping[ReadAction, ReadHandler],
    ) -> None:
        missing = [a.name for a in WriteAction if a is not WriteAction.NONE and a not in writers]
        missing += [a.name for a in ReadAction if a not in readers]
        if missing:
            raise ValueError(f"register actions without a handler: {missing}")
        self._writers = dict(writers)
        self._readers = dict(readers)
        self.values: dict[int, int] = {}
        self.reset({})

    def reset(self, initial: Mapping[str, int]) -> None:
        """Power-on values, with ``initial`` (by register name) for the per-instance ones."""
        values = {r.offset: r.reset for r in regs.REGISTERS}
        for name, value in initial.items():
            values[regs.BY_NAME[name].offset] = value & 0xFFFFFFFF
        self.values = values

    # ---------------------------------------------------------------- by the device

    def get(self, name: str) -> int:
        return self.values[regs.BY_NAME[name].offset]

    def set(self, name: str, value: int) -> None:
        self.values[regs.BY_NAME[name].offset] = value & 0xFFFFFFFF

    def get64(self, name: str) -> int:
        """A 64-bit value kept in NAME_LO and NAME_HI."""
        return self.get(f"{name}_LO") | self.get(f"{name}_HI") << 32

    def set64(self, name: str, value: int) -> None:
        self.set(f"{name}_LO", value)
        self.set(f"{name}_HI", value >> 32)

    # ---------------------------------------------------------------- by the guest

    def read_word(self, offset: int) -> int:
        register = regs.BY_OFFSET.get(offset)
        if register is not None and register.on_read is not None:
            return self._readers[register.on_read]() >> register.shift & 0xFFFFFFFF
        return self.values.get(offset, 0)

    def read(self, offset: int, count: int) -> bytes:
        first, last = offset & ~3, (offset + count + 3) & ~3
        words = b"".join(self.read_word(o).to_bytes(4, "little") for o in range(first, last, 4))
        start = offset - first
        return words[start : start + count]

    def write(self, offset: int, data: bytes) -> None:
        first, last = offset & ~3, (offset + len(data) + 3) & ~3
        for word_offset in range(first, last, 4):
            register = regs.BY_OFFSET.get(word_offset)
            if register is None or register.access is regs.Access.RO:
                continue  # writes to read-only or unassigned offsets are dropped
            current = bytearray(self.values[word_offset].to_bytes(4, "little"))
            lo, hi = max(offset, word_offset), min(offset + len(data), word_offset + 4)
            current[lo - word_offset : hi - word_offset] = data[lo - offset : hi - offset]
            value = int.from_bytes(current, "little")
            if register.on_write is not WriteAction.NONE:
                self._writers[register.on_write](register, value)
            elif register.access is regs.Access.RW:
                self.values[word_offset] = value


DYNAMIC_OFFSETS = frozenset(r.offset for r in regs.REGISTERS if r.on_read is not None)

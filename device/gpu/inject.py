"""Fault injection: make one instance misbehave on purpose, the way hardware does.

Theory of operation.  Each instance owns one ``Faults``: what is armed now.  The
table ``FAULTS`` is the single source of truth for what can be injected and with
which parameters (the control schema in docs/control.md is generated from it).
``arm`` checks the parameters and arms a fault; the device's parts consult their
own piece through a cheap boolean first (``engine_armed``, ``irq_armed``,
``dma_armed``), so an instance with nothing armed pays one attribute test:

    engine-hang        the next ring command blocks until a device reset (the reset
                       then drops it) or ``clear`` (it then runs normally)
    ring-error         the next COUNT ring commands fail with CODE (ring ERROR)
    dma-error          the next COUNT guest-memory transfers fail (engine commands get
                       DMA_FAULT, bring-up DMA gets DMA_ERROR = EIO)
    irq-drop           the next COUNT interrupt signals are lost (0: all, until clear)
    irq-delay          interrupt signals arrive DELAY seconds late (COUNT of them, 0: all)
    irq-spurious       one interrupt on VECTOR with nothing pending in INT_STATUS
    alloc-fail         the next COUNT resource CREATEs fail with NO_MEMORY
    slow-fault         aperture faults take DELAY seconds longer (COUNT of them, 0: all)
    surprise-removal   the device is gone: every trapped read returns all ones,
                       writes are dropped, DMA fails; ``clear`` brings it back
    bit-flip           one bit of a resource's memory flips (``GpuInstance.flip_bit``)

Counted faults disarm themselves when their count is used up.  A device reset
releases an engine hang; every other armed fault survives resets until cleared.

The device-memory model reaches the state by instance name, with two calls:
``fault_delay(name)`` (seconds to sleep in the fault callback) and
``allocation_should_fail(name)`` (at resource CREATE); ``flip_bit`` flips a bit in
any writable buffer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from device.errors import DeviceError
from device.gpu.abi import ErrorCode


@dataclass(frozen=True)
class Param:
    type: type  # int, float or str
    default: Any  # None: required
    doc: str


@dataclass(frozen=True)
class FaultSpec:
    name: str
    doc: str
    params: dict[str, Param]


_COUNT = Param(int, 1, "how many times (0: every time, until cleared)")
FAULTS: dict[str, FaultSpec] = {
    spec.name: spec
    for spec in (
        FaultSpec("engine-hang", "the next ring command never completes until a reset", {}),
        FaultSpec(
            "ring-error",
            "the next COUNT ring commands fail with CODE",
            {"count": _COUNT, "code": Param(str, "ENGINE_FAULT", "an ErrorCode name")},
        ),
        FaultSpec("dma-error", "the next COUNT guest-memory transfers fail", {"count": _COUNT}),
        FaultSpec("irq-drop", "the next COUNT interrupts are lost", {"count": _COUNT}),
        FaultSpec(
            "irq-delay",
            "interrupts arrive DELAY seconds late",
            {"delay": Param(float, None, "seconds"), "count": Param(int, 0, _COUNT.doc)},
        ),
        FaultSpec(
            "irq-spurious",
            "one interrupt on VECTOR with nothing pending",
            {"vector": Param(int, 0, "the vector to signal")},
        ),
        FaultSpec("alloc-fail", "the next COUNT resource CREATEs fail", {"count": _COUNT}),
        FaultSpec(
            "slow-fault",
            "aperture faults take DELAY seconds longer",
            {"delay": Param(float, None, "seconds"), "count": Param(int, 0, _COUNT.doc)},
        ),
        FaultSpec("surprise-removal", "reads return all ones, writes are dropped, DMA fails", {}),
        FaultSpec(
            "bit-flip",
            "flip one bit of a resource's memory",
            {
                "handle": Param(int, None, "the resource"),
                "offset": Param(int, 0, "byte offset in the resource"),
                "bit": Param(int, 0, "bit 0..7 of that byte"),
            },
        ),
    )
}
MAX_DELAY = 60.0


def check_params(fault: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters of ``fault`` with defaults filled in; ValueError says what is wrong."""
    spec = FAULTS.get(fault)
    if spec is None:
        raise ValueError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
    unexpected = sorted(set(params) - spec.params.keys())
    if unexpected:
        raise ValueError(f"fault {fault} takes no parameter {unexpected[0]!r}")
    checked: dict[str, Any] = {}
    for name, param in spec.params.items():
        value = params.get(name, param.default)
        if value is None:
            raise ValueError(f"fault {fault} needs parameter {name!r} ({param.doc})")
        if param.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, param.type) or isinstance(value, bool):
            raise ValueError(f"parameter {name!r} of {fault} must be {param.type.__name__}")
        checked[name] = value
    _check_ranges(fault, checked)
    return checked


def _check_ranges(fault: str, params: dict[str, Any]) -> None:
    if params.get("count", 0) < 0:
        raise ValueError("count must be >= 0")
    if not 0 <= params.get("delay", 0.0) <= MAX_DELAY:
        raise ValueError(f"delay must be 0..{MAX_DELAY:g} seconds")
    if fault == "ring-error" and params["code"] not in ErrorCode.__members__:
        raise ValueError(f"unknown error code {params['code']!r}")
    if fault == "bit-flip" and not 0 <= params["bit"] <= 7:
        raise ValueError("bit must be 0..7")
    if params.get("offset", 0) < 0 or params.get("handle", 0) < 0:
        raise ValueError("handle and offset must be >= 0")


class _Counted:
    """An armed fault with a count (0: unlimited) and a value."""

    def __init__(self, count: int, value: Any = None) -> None:
        self.count = count
        self.value = value


class Faults:
    """What is armed on one instance (all methods are thread-safe)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.armed: dict[str, _Counted] = {}
        self.engine_armed = False
        self.irq_armed = False
        self.dma_armed = False
        self.removed = False
        self._hang_released = threading.Event()
        self._hang_dropped = False
        self._hanging = 0  # ring commands held by an engine hang now
        self.history: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- arming

    def arm(self, fault: str, params: dict[str, Any]) -> dict[str, Any]:
        """Arm ``fault`` (checked by ``check_params``); its effective parameters."""
        checked = check_params(fault, params)
        with self.lock:
            count = checked.get("count", 1)
            value = checked.get("delay", checked.get("code"))
            self.armed[fault] = _Counted(count, value)
            if fault == "engine-hang":
                self._hang_released.clear()
                self._hang_dropped = False
            self.history.append({"fault": fault, **checked, "time": time.time()})
            self._refresh()
        return checked

    def clear(self, fault: str | None = None) -> list[str]:
        """Disarm one fault or all; the names disarmed, or released (a hung command runs
        on: its engine-hang is cleared too, though no longer armed)."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
        with self.lock:
            names = [fault] if fault is not None else list(self.armed)
            gone = [n for n in names if self.armed.pop(n, None) is not None]
            if fault in (None, "engine-hang") and self._hanging and "engine-hang" not in gone:
                gone.append("engine-hang")
            self._refresh()
        if fault in (None, "engine-hang"):
            self._hang_released.set()
        return gone

    def describe(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {n: {"count": c.count, "value": c.value} for n, c in self.armed.items()}

    def _refresh(self) -> None:
        armed = self.armed
        self.engine_armed = "engine-hang" in armed or "ring-error" in armed
        self.irq_armed = "irq-drop" in armed or "irq-delay" in armed
        self.dma_armed = "dma-error" in armed or "surprise-removal" in armed
        self.removed = "surprise-removal" in armed

    def _use(self, fault: str) -> _Counted | None:
        with self.lock:
            counted = self.armed.get(fault)
            if counted is None:
                return None
            if counted.count > 0:
                counted.count -= 1
                if counted.count == 0:
                    del self.armed[fault]
                    self._refresh()
            return counted

    # ---------------------------------------------------------------- the device's hooks

    def before_command(self) -> bool:
        """Before a ring command (``engine_armed``): hang, or raise an injected ring
        error.  False: the command was hung and a reset dropped it."""
        if self._use_hang():
            with self.lock:
                self._hanging += 1
            self._hang_released.wait()
            with self.lock:
                self._hanging -= 1
            return not self._hang_dropped
        counted = self._use("ring-error")
        if counted is not None:
            raise DeviceError(ErrorCode[counted.value], "injected ring error")
        return True

    def _use_hang(self) -> bool:
        with self.lock:
            if self.armed.pop("engine-hang", None) is None:
                return False
            self._refresh()
            return True

    def on_reset(self) -> None:
        """A device reset: a hung command is released and dropped."""
        self._hang_dropped = True
        self._hang_released.set()

    def dma_should_fail(self) -> str | None:
        """Before a guest-memory transfer (``dma_armed``): why it fails, or None."""
        if self.removed:
            return "the device was removed (injected surprise removal)"
        return "injected DMA error" if self._use("dma-error") is not None else None

    def filter_vectors(self, vectors: list[int], signal: Callable[[list[int]], None]) -> list[int]:
        """Interrupt signals about to go out (``irq_armed``): the ones to send now.  A
        delayed one is sent by a timer with ``signal``."""
        if not vectors:
            return vectors
        if self._use("irq-drop") is not None:
            return []
        counted = self._use("irq-delay")
        if counted is not None:
            timer = threading.Timer(float(counted.value), signal, [vectors])
            timer.daemon = True
            timer.start()
            return []
        return vectors

    def fault_delay(self) -> float:
        counted = self._use("slow-fault")
        return float(counted.value) if counted is not None else 0.0

    def allocation_should_fail(self) -> bool:
        return self._use("alloc-fail") is not None


# ---------------------------------------------------------------------- by instance name

_registry: dict[str, Faults] = {}
_registry_lock = threading.Lock()


def register(faults: Faults) -> None:
    with _registry_lock:
        _registry[faults.name] = faults


def unregister(faults: Faults) -> None:
    with _registry_lock:
        if _registry.get(faults.name) is faults:
            del _registry[faults.name]


def of(name: str) -> Faults | None:
    return _registry.get(name)


def fault_delay(name: str) -> float:
    """Seconds the fault callback of instance ``name`` must sleep before answering."""
    faults = _registry.get(name)
    return faults.fault_delay() if faults is not None and faults.armed else 0.0


def allocation_should_fail(name: str) -> bool:
    """Whether this resource CREATE of instance ``name`` must fail with NO_MEMORY."""
    faults = _registry.get(name)
    return faults.allocation_should_fail() if faults is not None and faults.armed else False


def flip_bit(buffer: memoryview | npt.NDArray[np.uint8], offset: int, bit: int) -> int:
    """Flip bit ``bit`` of byte ``offset`` of a writable buffer; the byte's new value."""
    if not 0 <= bit <= 7:
        raise ValueError("bit must be 0..7")
    view = memoryview(buffer).cast("B") if isinstance(buffer, memoryview) else buffer
    value = int(view[offset]) ^ (1 << bit)
    view[offset] = value
    return value

"""The displays of one server process, by name, and where each can be watched.

The control plane adds an instance's frame source when the instance is created and
removes it when it is destroyed; tests add in-process ``Framebuffer``s the same way.
Viewers (the VNC server, the web page) follow the registry through ``listeners``:
each is called as ``listener(change, name)`` from the thread that changed the
registry, so it must not block (the viewers queue the change for their own thread).
A viewer records where a display can be watched with ``set_address`` ("vnc" ->
"127.0.0.1:5900"); ``query-displays`` shows it.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from device.display.source import FrameSource

log = logging.getLogger(__name__)


class Change(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"


Listener = Callable[[Change, str], None]


@dataclass
class Display:
    source: FrameSource
    addresses: dict[str, str] = field(default_factory=dict)  # viewer -> where


class DisplayRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._displays: dict[str, Display] = {}
        self.listeners: list[Listener] = []

    def add(self, source: FrameSource, name: str | None = None) -> None:
        """Register a display under ``name`` (default: its own; ValueError if taken)."""
        name = source.name if name is None else name
        with self._lock:
            if name in self._displays:
                raise ValueError(f"a display named {name!r} exists already")
            self._displays[name] = Display(source)
        self._tell(Change.ADDED, name)

    def remove(self, name: str) -> None:
        """Forget a display (nothing if there is none of that name)."""
        with self._lock:
            found = self._displays.pop(name, None)
        if found is not None:
            self._tell(Change.REMOVED, name)

    def get(self, name: str) -> FrameSource | None:
        with self._lock:
            display = self._displays.get(name)
        return display.source if display is not None else None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._displays)

    def set_address(self, name: str, viewer: str, address: str | None) -> None:
        with self._lock:
            display = self._displays.get(name)
            if display is None:
                return
            if address is None:
                display.addresses.pop(viewer, None)
            else:
                display.addresses[viewer] = address

    def addresses(self, name: str) -> dict[str, str]:
        with self._lock:
            display = self._displays.get(name)
            return dict(display.addresses) if display is not None else {}

    def _tell(self, change: Change, name: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(change, name)
            except Exception:
                log.exception("display listener failed on %s %s", change.value, name)

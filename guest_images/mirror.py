"""The Debian mirror of the host's apt configuration (deb822 ``.sources`` files or
one-line ``sources.list``): the guest runtime's root is built from the same mirror,
and no registry's host name is written anywhere."""

from __future__ import annotations

import contextlib
import glob
import re
from pathlib import Path


def _deb822_sources(text: str) -> list[tuple[str, str]]:
    """(uri, suites) of each enabled ``deb`` stanza of a deb822 ``.sources`` file."""
    found: list[tuple[str, str]] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if ":" in line and not line.lstrip().startswith("#"):
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            found += [(uri, fields.get("suites", "")) for uri in fields.get("uris", "").split()]
    return found


def _one_line_sources(text: str) -> list[tuple[str, str]]:
    """(uri, suite) of each ``deb`` line of a one-line-style ``sources.list``."""
    found: list[tuple[str, str]] = []
    for line in text.splitlines():
        match = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if match:
            found.append((match.group(1), match.group(2)))
    return found


def host_mirror() -> str:
    """The main Debian archive URI of the host's apt configuration."""
    candidates: list[tuple[str, str]] = []  # (uri, suites)
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        candidates += _deb822_sources(Path(path).read_text())
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            candidates += _one_line_sources(Path(path).read_text())
    for uri, suites in candidates:
        if "security" in uri or "security" in suites:
            continue
        if "debian" in uri or any(s in suites for s in ("bookworm", "trixie", "stable")):
            return uri.rstrip("/")
    raise LookupError("no Debian mirror found in /etc/apt/sources.list{,.d}: configure apt first")

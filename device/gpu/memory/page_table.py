"""The GPU MMU behind BAR2: one instance's aperture page table.

Each aperture page maps one page of one resource, or nothing.  The guest driver maps
a page-aligned range of a resource at an aperture offset it chooses (MAP) or the
device chooses (MAP_ANY, PLACE), and unmaps ranges again (UNMAP, REMOVE); another
resource may be mapped at the same offset later.  A resource page is mapped at most
once: two aperture pages showing one device page could not stay coherent through
two page-cache copies, so such a MAP is refused (ALREADY_MAPPED).  The table maps
to *resource* pages, not device pages: which device page backs a resource page is
the resource's residency, decided at fault time (``validate_map_request`` in
``aperture/window.py``), so eviction and page-in never touch the table.

In ``static`` mode there is no translation at all (QEMU maps the instance's private
memory 1:1 at realize): a resource shows at the aperture offset of its pages in that
memory, and the table only records the mappings for observation.

Not thread-safe: the window's lock guards it.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.errors import DeviceError
from device.gpu.abi import ErrorCode
from device.gpu.memory.resources import Resource
from device.units import PAGE_SIZE


@dataclass(frozen=True)
class Entry:
    resource: Resource
    page: int  # page index within the resource


class ApertureTable:
    def __init__(self, size: int) -> None:
        self.size = size
        self.page_count = size // PAGE_SIZE
        self.entries: list[Entry | None] = [None] * self.page_count

    @staticmethod
    def page_range(offset: int, length: int) -> range:
        return range(offset // PAGE_SIZE, (offset + length + PAGE_SIZE - 1) // PAGE_SIZE)

    def lookup(self, page: int) -> Entry | None:
        return self.entries[page]

    def check_map(self, first: int, resource: Resource, res_first: int, count: int) -> None:
        """Raise DeviceError unless ``count`` pages of ``resource`` from page ``res_first``
        can be mapped at aperture page ``first``."""
        if count <= 0 or first < 0 or first + count > self.page_count:
            raise DeviceError(
                ErrorCode.OUT_OF_BOUNDS, f"aperture pages {first}+{count} outside {self.page_count}"
            )
        if res_first < 0 or res_first + count > resource.page_count:
            raise DeviceError(
                ErrorCode.OUT_OF_BOUNDS,
                f"resource pages {res_first}+{count} outside {resource.page_count}",
            )
        if any(self.entries[p] is not None for p in range(first, first + count)):
            raise DeviceError(ErrorCode.APERTURE_BUSY, "part of the aperture range is mapped")
        if any(p in resource.mapped_at for p in range(res_first, res_first + count)):
            raise DeviceError(
                ErrorCode.ALREADY_MAPPED, "part of the resource range is mapped elsewhere"
            )

    def map(self, first: int, resource: Resource, res_first: int, count: int) -> None:
        self.check_map(first, resource, res_first, count)
        for n in range(count):
            self.entries[first + n] = Entry(resource, res_first + n)
            resource.mapped_at[res_first + n] = first + n

    def unmap(self, first: int, count: int) -> list[int]:
        """Clear entries; returns the aperture pages that were mapped."""
        changed = []
        for page in range(max(0, first), min(self.page_count, first + count)):
            entry = self.entries[page]
            if entry is not None:
                del entry.resource.mapped_at[entry.page]
                self.entries[page] = None
                changed.append(page)
        return changed

    @staticmethod
    def pages_of(resource: Resource) -> list[int]:
        """The aperture pages that map ``resource``, in order."""
        return sorted(resource.mapped_at.values())

    def find_free(self, count: int) -> int | None:
        """The first aperture page of a free run of ``count`` pages (first fit)."""
        run = 0
        for page, entry in enumerate(self.entries):
            run = run + 1 if entry is None else 0
            if run == count:
                return page - count + 1
        return None

    def runs(self) -> list[dict[str, int | bool]]:
        """Mapped runs: aperture offset, length, handle, offset in the resource."""
        runs: list[dict[str, int | bool]] = []
        previous: Entry | None = None
        for page, entry in enumerate(self.entries):
            if entry is None:
                previous = None
                continue
            extends = (
                previous is not None
                and previous.resource is entry.resource
                and previous.page + 1 == entry.page
            )
            if extends:
                runs[-1]["length"] = int(runs[-1]["length"]) + PAGE_SIZE
            else:
                runs.append(
                    {
                        "aperture_offset": page * PAGE_SIZE,
                        "length": PAGE_SIZE,
                        "handle": entry.resource.handle,
                        "resource_offset": entry.page * PAGE_SIZE,
                        "resident": entry.resource.resident,
                    }
                )
            previous = entry
        return runs

"""PageAllocator keeps its free byte count (it is asked on every pool allocation)
equal to what its free runs add up to, whatever the order of allocations and frees."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from device.errors import OutOfMemory
from device.gpu.memory.allocator import Extent, PageAllocator

PAGE = 4096


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(0, 1000)), max_size=60))
def test_free_bytes_is_the_sum_of_the_free_runs(steps: list[tuple[bool, int, int]]) -> None:
    allocator = PageAllocator(PAGE, 64 * PAGE)
    held: list[Extent] = []
    for allocate, pages, pick in steps:
        if allocate or not held:
            try:
                if pages % 2:
                    held.append(allocator.allocate(pages * PAGE))
                else:
                    held += allocator.allocate_pages(pages * PAGE)
            except OutOfMemory:
                pass
        else:
            allocator.free(held.pop(pick % len(held)))
        runs = sum(allocator._free_sizes.values())
        assert allocator.free_bytes == runs == 64 * PAGE - sum(e.size for e in held)

"""Freed model memory goes back to the system (`llm.memory.release_memory`)."""

from __future__ import annotations

import pytest

from matrix_assets.llm.memory import _malloc_trim, release_memory


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(_malloc_trim() is None, reason="malloc_trim is glibc's")
def test_freed_heap_pages_between_live_blocks_are_returned() -> None:
    """Blocks freed between survivors stay in glibc's heap (free() only trims its top); release_memory returns
    their pages, as it does for a freed model's tensors."""
    blocks = [bytearray(64 * 1024) for _ in range(6000)]  # ~375 MiB in heap-sized chunks
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    survivors = blocks[::50]
    del blocks
    before = _rss_mib()
    release_memory()
    after = _rss_mib()
    assert before - after > 150, (before, after)
    assert survivors

"""Test subject: the first wait at a call site comes inside an iteration
that is mostly CPU work (reported as a stall, named by its CPU samples),
and the same call site then blocks on its own, three times within a
second.

The kernel sends a call site's stacks with its first wait and counts the
site as known for a while after; the waits that follow must still be
named down to their native frames (libc's wait), whatever became of the
first one's episode.

    python asyncio_stall_then_wait.py
"""

import asyncio
import time


def nap(seconds: float) -> None:
    time.sleep(seconds)  # BLOCKS: nap


def work(spin_s: float, nap_s: float) -> None:
    end = time.perf_counter() + spin_s
    while time.perf_counter() < end:
        pass
    nap(nap_s)


async def main() -> None:
    # The loop idles first: its thread is known and its interpreter read.
    await asyncio.sleep(1.0)
    # One call line for every round, so that every wait is one call site.
    for spin_s, nap_s in [(0.12, 0.004), (0.0, 0.03), (0.0, 0.03), (0.0, 0.03)]:
        work(spin_s, nap_s)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)


asyncio.run(main())

"""Test subject for exact strict counts: one coroutine calls os.stat many
times from one line, never leaving the CPU (the file is in the page
cache), as fast as the interpreter goes.

Timeline (about 1.5 s):
  0.00  asyncio.run(main()):
          await asyncio.sleep(1.0)        -> idle (the loop is tagged, its
                                             interpreter found)
          stat_many(N): N x os.stat       -> N strict calls (newfstatat or
                                             statx), one call site
          await asyncio.sleep(0.2)        -> idle
Prints nothing. N is the first argument (default 40000).
"""

import asyncio
import os
import sys

HERE = os.path.abspath(__file__)


def stat_many(n: int) -> int:
    size = 0
    for _ in range(n):
        size += os.stat(HERE).st_size
    return size


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40000
    await asyncio.sleep(1.0)
    stat_many(n)
    await asyncio.sleep(0.2)


if __name__ == "__main__":
    os.stat(HERE)  # no loop yet: not counted
    asyncio.run(main())

"""Test subject for --strict and stall detection: calls that block the
event loop without leaving the CPU, and CPU work that stalls it.

Timeline (about 3 s):
  0.00  asyncio.run(main()):
          await asyncio.sleep(1.0)                    -> idle (the loop is tagged)
          5 x read_cached_file(): open(small file).read()
              and 5 x stat_file(): os.stat            -> strict: openat, newfstatat...
              (served from the page cache: never off the CPU)
          blocking_sleep(): time.sleep(0.05)          -> off-CPU event, not strict
          run_in_executor(None, executor_reads)       -> nothing (executor thread)
          await asyncio.sleep(0.3)                    -> idle, not a stall
          cpu_hog(0.3): 300 ms of pure-Python CPU work -> a stall of ~300 ms
          await asyncio.sleep(0.4)                    -> idle
Prints nothing. The file it reads is this script itself. An argument
sets the first idle time in seconds (default 1.0).
"""

import asyncio
import os
import sys
import time

HERE = os.path.abspath(__file__)


def read_cached_file() -> int:
    # Home Assistant's canonical bug: open() in a coroutine.
    with open(HERE, "rb") as f:
        return len(f.read())


def stat_file() -> int:
    return os.stat(HERE).st_size


def blocking_sleep() -> None:
    # Off the CPU for 50 ms: an off-CPU event, never also a strict call.
    time.sleep(0.05)


def executor_reads() -> None:
    for _ in range(5):
        read_cached_file()
        stat_file()


def cpu_hog(seconds: float) -> int:
    # CPU time, not wall time: a loaded machine that preempts the loop
    # makes the stall longer, never shorter.
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += sum(i * i for i in range(200))
    return n


async def main() -> None:
    loop = asyncio.get_running_loop()
    # Long enough for blockwatch to find the interpreter (Python frames);
    # the daemon looks every 2 s, so its test asks for more (argv[1]).
    await asyncio.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
    for _ in range(5):
        read_cached_file()
        await asyncio.sleep(0.02)
    for _ in range(5):
        stat_file()
        await asyncio.sleep(0.02)
    blocking_sleep()
    await asyncio.sleep(0.02)
    await loop.run_in_executor(None, executor_reads)
    await asyncio.sleep(0.3)
    cpu_hog(0.3)
    await asyncio.sleep(0.4)


if __name__ == "__main__":
    read_cached_file()  # warm the page cache (and no loop yet: not reported)
    asyncio.run(main())

"""Test subject: event loops that end and begin again, in one thread and in
two threads of one process.

Usage: python3 asyncio_loops.py two-runs | two-threads

two-runs: `asyncio.run` twice in the main thread (as scripts and
pytest-asyncio do). Each loop blocks once (first_block 60 ms,
second_block 70 ms); after each loop has ended the script sleeps 200 ms
and 150 ms, which is no loop's time and must not be reported.

two-threads: two threads each run their own loop, which blocks once
(thread_block 60 ms) after idling; nothing else blocks a loop.
"""

import asyncio
import sys
import threading
import time


def first_block() -> None:
    time.sleep(0.06)


def second_block() -> None:
    time.sleep(0.07)


def thread_block() -> None:
    time.sleep(0.06)


async def run_and_block(block) -> None:
    await asyncio.sleep(0.3)   # idle: the thread is found to run a loop
    block()                    # blocks this loop
    await asyncio.sleep(0.05)


def two_runs() -> None:
    asyncio.run(run_and_block(first_block))
    time.sleep(0.2)            # the first loop has ended
    asyncio.run(run_and_block(second_block))
    time.sleep(0.15)           # the second loop has ended too


def two_threads() -> None:
    threads = [
        threading.Thread(target=asyncio.run, args=(run_and_block(thread_block),))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    {"two-runs": two_runs, "two-threads": two_threads}[sys.argv[1]]()

"""Test subject: an asyncio loop that starts and joins 500 short-lived
threads, and blocks itself once with time.sleep(0.08).

The loop thread creates every thread itself (so a tag that leaked from the
loop thread to the threads it creates would show), in batches of 10; each
thread sleeps 1 ms and exits, so thread IDs are recycled quickly. Only the
one time.sleep(0.08) on the loop thread must be reported. Runs ~1-2 s,
prints nothing.
"""

import asyncio
import threading
import time

THREADS = 500
BATCH = 10


def short_lived() -> None:
    time.sleep(0.001)


async def main() -> None:
    await asyncio.sleep(0.2)  # let the loop idle first
    for i in range(0, THREADS, BATCH):
        batch = [threading.Thread(target=short_lived) for _ in range(BATCH)]
        for t in batch:
            t.start()
        await asyncio.sleep(0.003)
        for t in batch:
            t.join()
        if i == THREADS // 2:
            time.sleep(0.08)  # the one blocking call
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)


if __name__ == "__main__":
    asyncio.run(main())

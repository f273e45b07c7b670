"""Test subject: an asyncio program that blocks its event loop three times.

Timeline (about 1.9 s in all):
  0.00  time.sleep(0.31) before the loop exists      -> not reported (no loop yet)
  0.31  asyncio.run(main()):
          await asyncio.sleep(0.4)                     -> not reported (loop idles)
          run_in_executor(None, time.sleep, 0.33)      -> not reported (executor thread)
          3 x time.sleep(0.08) inside a coroutine,
              with awaits between                      -> reported: 3 events, class
                                                          sleep, main thread, ~80 ms
Every wait that must not be reported lasts >= 300 ms and every one that must
be reported lasts 80 ms, so a test can tell them apart by duration alone.
Runs under Debian's /usr/bin/python3 and pyenv builds (3.10+). Prints nothing.
"""

import asyncio
import time


def blocking_sleep_in_coroutine() -> None:
    # The bug blockwatch looks for: a synchronous sleep on the loop thread.
    time.sleep(0.08)


async def handler() -> None:
    for _ in range(3):
        blocking_sleep_in_coroutine()
        await asyncio.sleep(0.05)


async def main() -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.4)
    await loop.run_in_executor(None, time.sleep, 0.33)
    await asyncio.sleep(0.05)
    await handler()
    await asyncio.sleep(0.05)


if __name__ == "__main__":
    time.sleep(0.31)
    asyncio.run(main())

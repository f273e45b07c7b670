"""Test subject: an asyncio program that blocks its loop soon after it starts.

The loop idles once (`await asyncio.sleep(DELAY)`, 30 ms unless given),
then a coroutine calls `time.sleep(0.08)`: the blocking call begins DELAY
after the loop first idles, before any timer would have found the
interpreter. blockwatch must name `early_block` anyway. The process then
idles 0.2 s more and exits.

Usage: python3 python_early_block.py [DELAY_SECONDS]
"""

import asyncio
import sys
import time


def early_block() -> None:
    time.sleep(0.08)


async def main(delay: float) -> None:
    await asyncio.sleep(delay)
    early_block()
    await asyncio.sleep(0.2)


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.03))

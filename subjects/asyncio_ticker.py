"""Test subject: an asyncio loop that ticks every 50 ms for a while.

    python3 asyncio_ticker.py [--block SECONDS] [--seconds SECONDS]

Prints "ready" (and flushes) once its loop runs, so a test can wait for it.
With --block, every tick also calls time.sleep(SECONDS) on the loop: a
process that blockwatch would report if it watched it. Without it, the loop
only idles: a process that must produce no events. Exits 0 after --seconds
(default 30; tests kill it sooner).
"""

import argparse
import asyncio
import sys
import time


async def main(block: float, seconds: float) -> None:
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if block > 0:
            time.sleep(block)
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--block", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(main(args.block, args.seconds))
    sys.exit(0)

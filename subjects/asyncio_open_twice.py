"""Test subject for one call site seen by two detectors: open_once() opens
a file from one line, first a cached regular file (an openat that never
leaves the CPU: only --strict sees it), then a FIFO whose writer comes
100 ms later (an openat that waits off the CPU), so both detectors must
give the same stack and culprit.

Timeline (about 1.5 s):
  0.00  asyncio.run(main()):
          await asyncio.sleep(1.0)        -> idle (the loop is tagged)
          5 x open_once(this script)      -> strict: openat (5 calls; the
                                             interpreter specialises the
                                             call after the first)
          open_once(FIFO), writer 100 ms
          later                           -> off-CPU: openat, ~100 ms
          await asyncio.sleep(0.2)        -> idle
Prints nothing.
"""

import asyncio
import os
import subprocess
import tempfile

HERE = os.path.abspath(__file__)


def open_once(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


async def main() -> None:
    await asyncio.sleep(1.0)
    for _ in range(5):
        open_once(HERE)
    with tempfile.TemporaryDirectory() as d:
        fifo = os.path.join(d, "fifo")
        os.mkfifo(fifo)
        writer = subprocess.Popen(["sh", "-c", f"sleep 0.1; echo x > '{fifo}'"])
        open_once(fifo)
        writer.wait()
    await asyncio.sleep(0.2)


if __name__ == "__main__":
    asyncio.run(main())

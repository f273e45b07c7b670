"""Test subject for strict mode past its limits: one coroutine calls
os.stat once from each of N distinct functions (default 17,000), so there
are more call sites than the kernel's site map holds (16,384), and their
first calls send more stacks than the ring buffer takes at once.

Timeline (about 2 s):
  0.00  N functions made with exec() (no loop yet)
        asyncio.run(main()):
          await asyncio.sleep(1.0)        -> idle (the loop is tagged)
          site_0() ... site_{N-1}()       -> N strict newfstatat, N sites
          await asyncio.sleep(0.3)        -> idle
Prints nothing.
"""

import asyncio
import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 17000

SITES = []
for i in range(N):
    scope = {"os": os}
    exec(f"def site_{i}():\n    os.stat('/')\n", scope)
    SITES.append(scope[f"site_{i}"])


async def main() -> None:
    await asyncio.sleep(1.0)
    for site in SITES:
        site()
    await asyncio.sleep(0.3)


if __name__ == "__main__":
    asyncio.run(main())

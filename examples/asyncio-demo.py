"""A small asyncio service with three bugs that block its event loop.

`cargo xtask demo` runs it under `blockwatch trace`. It serves a burst of
fake requests for about 5 seconds and exits. Three handlers block the loop:
  - rate_limited_lookup: time.sleep(0.15) instead of await asyncio.sleep
  - save_report: os.fsync() of a freshly written 64 MB file
  - make_thumbnail: subprocess.run(["sleep", "0.1"]) instead of
    asyncio.create_subprocess_exec
Everything else awaits properly (asyncio.sleep stands in for network I/O).
"""

import asyncio
import os
import subprocess
import tempfile
import time

SCRATCH = "/var/tmp" if os.path.isdir("/var/tmp") else None


async def fetch_user(uid: int) -> dict:
    await asyncio.sleep(0.02)  # correct: a non-blocking "database" call
    return {"id": uid, "name": f"user{uid}"}


async def rate_limited_lookup(uid: int) -> dict:
    time.sleep(0.15)  # BUG: blocks the loop; should be await asyncio.sleep(0.15)
    return await fetch_user(uid)


async def save_report(rows: list) -> None:
    chunk = ("".join(row + "\n" for row in rows).encode() * 5000)[: 1 << 20]
    with tempfile.NamedTemporaryFile(dir=SCRATCH) as f:
        for _ in range(64):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())  # BUG: waits for the disk on the loop


async def make_thumbnail(uid: int) -> None:
    subprocess.run(["sleep", "0.1"], check=True)  # BUG: a blocking child process


async def handle(i: int) -> None:
    # Requests arrive 200 ms apart, longer than any bug blocks: each
    # blocking call falls in its own iteration of the loop, one event each
    # (calls that blocked the same iteration would be one loop episode).
    await asyncio.sleep(0.2 * (i % 4))
    user = await fetch_user(i)
    if i % 4 == 1:
        await rate_limited_lookup(i)
    elif i % 4 == 2:
        await make_thumbnail(i)
    elif i == 7:
        await save_report([f"{user['id']},{user['name']},{n * 3.5:.1f}" for n in range(20)])


async def main() -> None:
    for burst in range(4):
        await asyncio.gather(*(handle(burst * 4 + i) for i in range(4)))
        await asyncio.sleep(0.5)  # correct: idle between bursts


if __name__ == "__main__":
    asyncio.run(main())

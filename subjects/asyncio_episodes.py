"""Test subject: one coroutine blocks its loop with many short waits, none
long enough to report alone, which together block it for long.

    python asyncio_episodes.py SCENARIO

  sleeps     many_short_sleeps(): 20 x time.sleep(0.006) in one coroutine,
             with no await between: one loop iteration of ~120 ms made of
             20 waits of 6 ms.
  cold-read  read_cold_file(): one os.read() of a 64 MiB file that is not
             in the page cache (written, fsynced and dropped with
             posix_fadvise(DONTNEED) before the loop starts): the read
             sleeps on the disk many times, a few ms or less each.
  signal     busy_signal_handler() computes for 150 ms, run by CPython
             while the loop is asleep in its select (SIGALRM from a
             timer), before its callbacks: the one episode to report,
             though asyncio's iteration clock (`end_time`) is not set yet.

Each scenario idles 0.3 s in the loop first (the loop is learned), blocks,
then idles 0.3 s again. The file goes to $BLOCKWATCH_SCRATCH_DIR, else
/var/tmp (a disk, where /tmp may be tmpfs), and is deleted afterwards.
Prints what it did to stderr (stdout is blockwatch's, under `trace --`).
"""

import asyncio
import os
import signal
import sys
import time

SLEEPS = 20
SLEEP_SECONDS = 0.006
FILE_SIZE = 64 << 20


async def many_short_sleeps() -> None:
    # The bug: short synchronous sleeps in a coroutine, in its own body.
    for _ in range(SLEEPS):
        time.sleep(SLEEP_SECONDS)


def read_cold_file(path: str) -> int:
    # The bug: one synchronous read of a whole large file on the loop.
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, FILE_SIZE)
    finally:
        os.close(fd)
    return len(data)


async def handler(path: str) -> int:
    return read_cold_file(path)


def write_uncached(path: str) -> None:
    """A FILE_SIZE file on disk, none of it in the page cache."""
    chunk = bytes(range(256)) * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(FILE_SIZE // len(chunk)):
            os.write(fd, chunk)
        # Dirty pages cannot be dropped: write them out first.
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def scratch_dir() -> str:
    for d in (os.environ.get("BLOCKWATCH_SCRATCH_DIR"), "/var/tmp"):
        if d and os.path.isdir(d):
            return d
    return "/tmp"


async def sleeps() -> None:
    await asyncio.sleep(0.3)
    start = time.perf_counter()
    await many_short_sleeps()
    took = time.perf_counter() - start
    print(f"sleeps: {SLEEPS} x {SLEEP_SECONDS * 1e3:.0f} ms in {took * 1e3:.1f} ms",
          file=sys.stderr)
    await asyncio.sleep(0.3)


async def cold_read(path: str) -> None:
    await asyncio.sleep(0.3)
    start = time.perf_counter()
    n = await handler(path)
    took = time.perf_counter() - start
    print(f"cold-read: {n} bytes in one read() in {took * 1e3:.1f} ms", file=sys.stderr)
    await asyncio.sleep(0.3)


def busy_signal_handler(signum, frame) -> None:
    # The bug: CPU work in a signal handler, which runs on the loop's thread.
    start = time.perf_counter()
    while time.perf_counter() - start < 0.15:
        pass


async def signal_during_select() -> None:
    await asyncio.sleep(0.3)
    signal.signal(signal.SIGALRM, busy_signal_handler)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    start = time.perf_counter()
    await asyncio.sleep(0.6)
    print(f"signal: slept 0.6 s in {(time.perf_counter() - start) * 1e3:.1f} ms",
          file=sys.stderr)
    await asyncio.sleep(0.3)


def main() -> int:
    scenario = sys.argv[1] if len(sys.argv) > 1 else ""
    if scenario == "sleeps":
        asyncio.run(sleeps())
    elif scenario == "cold-read":
        path = os.path.join(scratch_dir(), f"asyncio-episodes-{os.getpid()}.bin")
        try:
            write_uncached(path)
            asyncio.run(cold_read(path))
        finally:
            os.unlink(path)
    elif scenario == "signal":
        asyncio.run(signal_during_select())
    else:
        print("usage: asyncio_episodes.py sleeps|cold-read|signal", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Test subject for perf maps that reuse code space (run with CPython 3.12+
and `-X perf`, which writes /tmp/perf-PID.map like V8's --perf-basic-prof).

A JIT that frees code and compiles other code at the same address appends
a new line and leaves the old one: the newest line names what runs there.
This subject writes such lines over its own trampoline for handle_login:
an older one (a larger start, still covering it) and then the newest.

Timeline (about 1.5 s):
  0.00  idle 0.3 s in asyncio (the loop is tagged)
  0.30  handle_login blocks 120 ms    -> named py::handle_login (Python's line)
  1.00  the map grows: an old line naming `duplex_stale` and the newest
        naming `handle_login_recompiled`, both over the same address
  1.05  handle_login blocks 120 ms    -> named handle_login_recompiled
Prints nothing.
"""

import asyncio
import os
import time


def handle_login(block):
    if block:
        time.sleep(0.12)


def rewrite_map():
    path = f"/tmp/perf-{os.getpid()}.map"
    with open(path) as f:
        line = next(l for l in f if l.rstrip().endswith(":" + __file__) and "handle_login" in l)
    start, size = (int(x, 16) for x in line.split()[:2])
    with open(path, "a") as f:
        f.write(f"{start + 1:x} {size - 1:x} py::duplex_stale:node:internal/streams/duplex\n")
        f.write(f"{start:x} {size:x} py::handle_login_recompiled:{__file__}\n")
        f.flush()


async def main():
    handle_login(False)
    await asyncio.sleep(0.3)
    handle_login(True)
    # Long enough for blockwatch to name the first event from the map as
    # it was (its first event also reads the binaries' symbols).
    await asyncio.sleep(0.6)
    rewrite_map()
    await asyncio.sleep(0.05)
    handle_login(True)
    await asyncio.sleep(0.05)


asyncio.run(main())

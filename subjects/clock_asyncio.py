"""Test subject for the loop clock: an asyncio loop driven from stdin.

    python3 clock_asyncio.py [--thread] [--uvloop]

With --thread the loop runs in a second thread (the main thread joins it);
with --uvloop it is uvloop's loop rather than asyncio's own.
Prints "ready" once its loop runs and idles (asleep in epoll_wait on its
selector, waiting for stdin). Then, for each line read:

- "tick": a callback every 1 ms for 400 ms, each computing for 0.3 ms, so
  a reader sees the loop in its callbacks as well as asleep in its select
  (prints "ticking", then "ticked");
- "busy": one callback that computes for 300 ms (prints "busy NS" as it
  starts, "done NS" after, NS the time.monotonic_ns() of each moment), and
  schedules a call halfway (uvloop's `loop.time()` then updates its libuv
  loop's time: the callback is still one iteration);
- "saturate": call_soon chains for 300 ms, so work is always ready and the
  loop never sleeps (prints "saturating", then "saturated").

Exits when stdin closes.
"""

import asyncio
import os
import sys
import time


def say(word):
    print(word, flush=True)


def spin(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1


def tick(loop, until):
    spin(0.0003)
    if loop.time() < until:
        loop.call_later(0.001, tick, loop, until)
    else:
        say("ticked")


def busy(loop):
    say("busy %d" % time.monotonic_ns())
    spin(0.15)
    loop.call_later(1.0, lambda: None)
    spin(0.15)
    say("done %d" % time.monotonic_ns())


def chain(loop, until):
    if loop.time() < until:
        loop.call_soon(chain, loop, until)
    else:
        say("saturated")


def on_line(loop, line, done):
    if line == "tick":
        say("ticking")
        tick(loop, loop.time() + 0.4)
    elif line == "busy":
        loop.call_soon(busy, loop)
    elif line == "saturate":
        say("saturating")
        # Two chains: each iteration has more work ready.
        chain(loop, loop.time() + 0.3)
        chain(loop, loop.time() + 0.3)
    elif line == "":
        done.set_result(None)


async def main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    pending = b""

    def readable():
        nonlocal pending
        data = os.read(fd, 4096)
        if not data:
            loop.remove_reader(fd)
            on_line(loop, "", done)
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            on_line(loop, line.decode().strip(), done)

    loop.add_reader(fd, readable)
    say("ready")
    await done


if __name__ == "__main__":
    run = asyncio.run
    if "--uvloop" in sys.argv[1:]:
        import uvloop

        run = uvloop.run
    if "--thread" in sys.argv[1:]:
        import threading

        t = threading.Thread(target=run, args=(main(),), name="loop")
        t.start()
        t.join()
    else:
        run(main())

"""Test subject: an aiohttp server (asyncio's default loop) with a fast
handler and one that computes on the loop.

    python aiohttp_server.py PORT

  GET /      -> fast_handler: a small JSON answer; never blocks the loop.
  GET /slow  -> slow_handler: 150 ms of pure computation in the handler's
                own body (no syscall: the clock is read through the vDSO),
                so the loop runs nothing else for >= 150 ms of wall time.

Prints "ready" once it accepts connections. Needs aiohttp, which the
system Python does not have: `cargo xtask test` and `cargo xtask bench`
install it in ~/.cache/blockwatch/bench-venv.
"""

import asyncio
import sys
import time

from aiohttp import web

SLOW_SECONDS = 0.150


async def fast_handler(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path, "ok": True})


async def slow_handler(request: web.Request) -> web.Response:
    # The computation stays in this frame (no helper function), so that the
    # handler itself is the innermost Python function of every CPU sample.
    end = time.perf_counter() + SLOW_SECONDS
    n = 0
    while time.perf_counter() < end:
        for i in range(1000):
            n += i * i
    return web.json_response({"path": request.path, "n": n % 1000})


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/", fast_handler)
    app.router.add_get("/slow", slow_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))

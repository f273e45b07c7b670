"""The asyncio HTTP server `cargo xtask bench` loads with wrk: aiohttp,
one small JSON answer per request after a little async work. It never
blocks its loop, so blockwatch reports nothing and what the bench measures
is the cost of watching it.

    python http_server.py PORT

Prints "ready" when it accepts connections.
"""

import asyncio
import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    await asyncio.sleep(0)
    return web.json_response({"path": request.path, "ok": True})


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))

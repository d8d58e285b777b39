"""An aiohttp web server behind the proxy in the interop tests: ``python aiohttp_app.py PORT``.

Routes:
  GET  /            plain text
  POST /echo        the body streamed back chunk by chunk as it arrives (chunked response)
  GET  /stream      ?count=N&interval=S: N lines, one write each, S seconds apart (chunked);
                    each line is JSON {"n": n, "t": <time.time() when written>}
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiohttp import web


async def index(request: web.Request) -> web.StreamResponse:
    return web.Response(text="hello from aiohttp\n")


async def echo(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "application/octet-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    async for chunk in request.content.iter_any():
        await response.write(chunk)
    await response.write_eof()
    return response


async def stream(request: web.Request) -> web.StreamResponse:
    count = int(request.query.get("count", "5"))
    interval = float(request.query.get("interval", "0.1"))
    response = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for n in range(1, count + 1):
        if n > 1:
            await asyncio.sleep(interval)
        await response.write(json.dumps({"n": n, "t": time.time()}).encode() + b"\n")
    await response.write_eof()
    return response


def main() -> None:
    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_post("/echo", echo)
    app.router.add_get("/stream", stream)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()

"""A Starlette app served by uvicorn and by hypercorn behind the proxy in the interop tests.

Routes:
  GET  /            plain text
  GET  /echo        JSON: method, path, the request headers as the app saw them
  POST /echo        the body back, with x-received-bytes
  GET  /sse         Server-Sent Events through sse-starlette: ?count=N&interval=S, each
                    event's data is {"n": n, "t": <server time.time() when sent>}, then one
                    ``event: done`` so a browser can close its EventSource (which would
                    otherwise reconnect and receive the events again)
  GET  /page        an HTML page whose EventSource and fetch write what they get into the DOM
  WS   /ws          echoes every message back, text or bytes
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>interop page</title></head>
<body>
<h1>interop page</h1>
<p>protocol: <span id="protocol">?</span></p>
<h2>fetch POST /echo</h2><pre id="echo">...</pre>
<h2>events</h2><ol id="events"></ol>
<p id="done"></p>
<script>
const started = performance.now();
document.getElementById("protocol").textContent =
  performance.getEntriesByType("navigation")[0].nextHopProtocol;
fetch("/echo", {method: "POST", body: "hello from the browser"})
  .then((r) => r.text())
  .then((t) => { document.getElementById("echo").textContent = t; })
  .catch((e) => { document.getElementById("echo").textContent = "failed: " + e; });
const source = new EventSource("/sse?count=%(count)d&interval=%(interval)s");
source.onmessage = (e) => {
  const li = document.createElement("li");
  const data = JSON.parse(e.data);
  li.textContent = e.data;
  li.dataset.n = data.n;
  li.dataset.sent = data.t;
  li.dataset.received = Date.now() / 1000;
  document.getElementById("events").appendChild(li);
};
source.addEventListener("done", (e) => {
  source.close();
  document.getElementById("done").textContent = "done " + e.data;
});
</script>
</body></html>
"""


async def index(request: Request) -> Response:
    return PlainTextResponse("hello from starlette\n")


async def echo(request: Request) -> Response:
    if request.method == "GET":
        return JSONResponse(
            {
                "method": request.method,
                "path": request.url.path,
                "headers": [[k, v] for k, v in request.headers.items()],
            }
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return Response(
        bytes(body),
        media_type=request.headers.get("content-type", "application/octet-stream"),
        headers={"x-received-bytes": str(len(body))},
    )


async def sse(request: Request) -> Response:
    count = int(request.query_params.get("count", "5"))
    interval = float(request.query_params.get("interval", "0.1"))

    async def events() -> AsyncIterator[dict[str, str]]:
        for n in range(1, count + 1):
            if n > 1:
                await asyncio.sleep(interval)
            yield {"id": str(n), "data": json.dumps({"n": n, "t": time.time()})}
        yield {"event": "done", "data": str(count)}

    return EventSourceResponse(events())


async def page(request: Request) -> Response:
    count = int(request.query_params.get("count", "10"))
    interval = float(request.query_params.get("interval", "0.3"))
    return HTMLResponse(PAGE % {"count": count, "interval": interval})


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


app = Starlette(
    routes=[
        Route("/", index),
        Route("/echo", echo, methods=["GET", "POST"]),
        Route("/sse", sse),
        Route("/page", page),
        WebSocketRoute("/ws", ws_echo),
    ]
)

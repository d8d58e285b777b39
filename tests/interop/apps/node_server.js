// Node.js's own http server behind the proxy in the interop tests:
//   node node_server.js PORT [KEEP_ALIVE_TIMEOUT_MS]
// Without the second argument Node's default keepAliveTimeout (5000 ms) is kept; Node then
// advertises it as "Keep-Alive: timeout=5" and closes a connection idle that long.
// Routes: GET / (text), GET /echo (JSON of the request), POST /echo (the body back),
// GET /sse (?count=N&interval=MS), GET /stats (connections accepted so far, as JSON).
"use strict";
const http = require("http");

const port = Number(process.argv[2]);
const server = http.createServer(handle);
if (process.argv[3] !== undefined) server.keepAliveTimeout = Number(process.argv[3]);

let connections = 0;
server.on("connection", () => { connections += 1; });

function handle(req, res) {
  const url = new URL(req.url, "http://localhost");
  if (url.pathname === "/") {
    res.setHeader("content-type", "text/plain");
    res.end("hello from node " + process.version + "\n");
  } else if (url.pathname === "/echo" && req.method === "POST") {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      res.setHeader("content-type", "application/octet-stream");
      res.setHeader("x-received-bytes", String(body.length));
      res.end(body);
    });
  } else if (url.pathname === "/echo") {
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ method: req.method, path: req.url, headers: req.headers }));
  } else if (url.pathname === "/sse") {
    const count = Number(url.searchParams.get("count") || 5);
    const interval = Number(url.searchParams.get("interval") || 100);
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    let n = 0;
    const tick = () => {
      n += 1;
      res.write("id: " + n + "\ndata: " + JSON.stringify({ n: n, t: Date.now() / 1000 }) + "\n\n");
      if (n < count) setTimeout(tick, interval);
      else res.end();
    };
    tick();
  } else if (url.pathname === "/stats") {
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ connections: connections }));
  } else {
    res.statusCode = 404;
    res.end("not found\n");
  }
}

server.listen(port, "127.0.0.1");

// Test subject: a Node `http` server (plain `node`, no flags) with a fast
// handler and one that computes on the loop.
//
//     node node_http_server.js PORT
//
//   GET /      -> fastHandler: a small JSON answer; never blocks the loop.
//   GET /slow  -> slowHandler: 150 ms of pure computation in the handler's
//                 own body (no syscall: performance.now() reads the clock
//                 through the vDSO), so libuv's loop runs nothing else for
//                 >= 150 ms of wall time.
//
// Prints "ready" once it accepts connections.
"use strict";

const http = require("http");
const { performance } = require("perf_hooks");

const SLOW_MS = 150;

function fastHandler(req, res) {
  const body = JSON.stringify({ path: req.url, ok: true });
  res.writeHead(200, { "content-type": "application/json" });
  res.end(body);
}

function slowHandler(req, res) {
  // The computation stays in this function (no helper), so that it is the
  // innermost JS frame of every CPU sample.
  const end = performance.now() + SLOW_MS;
  let n = 0;
  while (performance.now() < end) {
    for (let i = 0; i < 1000; i++) n += i * i;
  }
  const body = JSON.stringify({ path: req.url, n: n % 1000 });
  res.writeHead(200, { "content-type": "application/json" });
  res.end(body);
}

const port = Number(process.argv[2]);
const server = http.createServer((req, res) => {
  if (req.url === "/slow") {
    slowHandler(req, res);
  } else {
    fastHandler(req, res);
  }
});
server.listen(port, "127.0.0.1", () => {
  console.log("ready");
});

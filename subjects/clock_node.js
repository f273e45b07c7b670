// Test subject for the loop clock: Node's main loop driven from stdin.
//
//     node clock_node.js
//
// Prints "ready" once its loop idles (asleep in epoll_wait, waiting for
// stdin). Then, for each line read:
// - "tick": a timer every 1 ms for 400 ms, each computing for 0.3 ms
//   ("ticking", then "ticked");
// - "busy": one callback that computes for 300 ms ("busy NS" as it
//   starts, "done NS" after, NS the CLOCK_MONOTONIC time of each moment),
//   and sets a timer halfway (Node's timers then update the loop's time:
//   the callback is still one iteration);
// - "saturate": setImmediate chains for 300 ms, so the loop never sleeps
//   ("saturating", then "saturated").
// - "worker": starts a worker thread (which prints "ready" once its loop
//   runs) and hands it every later line: the same commands, run on the
//   worker's own loop.
// Exits when stdin closes. (Both threads write stdout with writeSync, so a
// marker is out before the work it announces.)
"use strict";

const fs = require("fs");
const { Worker, isMainThread, parentPort } = require("worker_threads");

function say(word) {
  fs.writeSync(1, word + "\n");
}

function spin(ms) {
  const end = process.hrtime.bigint() + BigInt(Math.round(ms * 1e6));
  let n = 0;
  while (process.hrtime.bigint() < end) n++;
  return n;
}

function tick() {
  say("ticking");
  const until = Date.now() + 400;
  const t = setInterval(() => {
    spin(0.3);
    if (Date.now() >= until) {
      clearInterval(t);
      say("ticked");
    }
  }, 1);
}

function busy() {
  setImmediate(() => {
    say(`busy ${process.hrtime.bigint()}`);
    spin(150);
    setTimeout(() => {}, 1000);
    spin(150);
    say(`done ${process.hrtime.bigint()}`);
  });
}

function saturate() {
  say("saturating");
  const until = Date.now() + 300;
  const chain = () => {
    if (Date.now() < until) setImmediate(chain);
    else say("saturated");
  };
  setImmediate(chain);
}

function run(line) {
  if (line === "tick") tick();
  else if (line === "busy") busy();
  else if (line === "saturate") saturate();
}

if (!isMainThread) {
  parentPort.on("message", run);
  setImmediate(() => say("ready"));
  return;
}

let worker = null;
let pending = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (data) => {
  pending += data;
  let i;
  while ((i = pending.indexOf("\n")) >= 0) {
    const line = pending.slice(0, i).trim();
    pending = pending.slice(i + 1);
    if (worker) worker.postMessage(line);
    else if (line === "worker") worker = new Worker(__filename);
    else run(line);
  }
});
process.stdin.on("end", () => process.exit(0));
setImmediate(() => say("ready"));

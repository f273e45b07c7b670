// Test subject for stall detection in Node: a timer callback that computes
// for ~300 ms keeps the libuv loop from its idle wait.
//
// Timeline (about 1.5 s): idle 500 ms (the loop is tagged), 300 ms of
// computation in a timer callback (a stall of ~300 ms), idle 400 ms, exit.
// Prints nothing.
"use strict";

// Wall time from the vDSO, no syscall: with process.cpuUsage() (getrusage)
// read every round, about half the samples would land in that syscall, and
// the stall could be named by it. A loaded machine that preempts the loop
// leaves the stall as long; the preemption is in its breakdown.
function nowMs() {
  return Number(process.hrtime.bigint()) / 1e6;
}

function cpuHog(ms) {
  const end = nowMs() + ms;
  let n = 0;
  while (nowMs() < end) {
    for (let i = 0; i < 1000; i++) n += i * i;
  }
  return n;
}

// The callback sets the 400 ms timer halfway through its work, as a
// handler arming a timeout does: Node's timers then update libuv's loop
// time in mid-callback, and the stall must still be one, of ~300 ms.
setTimeout(() => {
  cpuHog(150);
  setTimeout(() => {}, 400);
  cpuHog(150);
}, 500);

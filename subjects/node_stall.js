// Test subject for stall detection in Node: a timer callback that computes
// for ~300 ms keeps the libuv loop from its idle wait.
//
// Timeline (about 1.5 s): idle 500 ms (the loop is tagged), cpuHog(300): 300 ms of CPU
// in a timer callback (a stall of ~300 ms), idle 400 ms, exit. Prints nothing.
"use strict";

// CPU time, not wall time: a loaded machine that preempts the loop makes
// the stall longer, never shorter.
function cpuMs() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

function cpuHog(ms) {
  const end = cpuMs() + ms;
  let n = 0;
  while (cpuMs() < end) {
    for (let i = 0; i < 1000; i++) n += i * i;
  }
  return n;
}

setTimeout(() => {
  cpuHog(300);
  setTimeout(() => {}, 400);
}, 500);

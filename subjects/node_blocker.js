'use strict';
// Test subject: a Node program that blocks its libuv loop three times.
//
// Timeline (about 1.6 s in all), all driven by timers:
//   0.00  idle 0.4 s (the loop waits in epoll)              -> not reported
//   0.40  a 0.35 s timer (the loop waits in epoll)          -> not reported
//   0.75  execSync('sleep 0.12')                            -> reported (~120 ms,
//         libuv's spawn-sync waits on its own epoll/waitpid,   main thread)
//   0.92  execSync('sleep 0.12') again                      -> reported
//   1.09  Atomics.wait on an Int32Array for 90 ms           -> reported, class lock
//         (a futex wait on the loop thread)
// Waits that must not be reported last >= 350 ms; reported ones 90-120 ms.
// Prints nothing.

const { execSync } = require('child_process');

function blockingExecSync() {
  // The bug: a synchronous child process on the event loop.
  execSync('sleep 0.12');
}

function blockingAtomicsWait() {
  const cell = new Int32Array(new SharedArrayBuffer(4));
  // Nobody notifies: this waits the full 90 ms on a futex.
  Atomics.wait(cell, 0, 0, 90);
}

const after = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  await after(400);
  await after(350);
  blockingExecSync();
  await after(50);
  blockingExecSync();
  await after(50);
  blockingAtomicsWait();
  await after(50);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

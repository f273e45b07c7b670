'use strict';
// Test subject for naming JavaScript with no Node flags (no perf map): two
// blocking calls in cold functions, each called once, so V8 runs them in
// its interpreter, and the test names them from V8's frames.
//
// Usage: node node_no_flags.js FIFO
// Timeline (about 1.2 s), all driven by timers:
//   0.00  idle 0.4 s                                         -> not reported
//   0.40  rarelyRunReport(): execSync('sleep 0.12')          -> reported, class process
//   0.60  loadSettingsOnce(): readFileSync(FIFO), which
//         blocks in open() until a writer started 150 ms
//         earlier (asynchronously) opens the FIFO            -> reported, class file
// Prints nothing.

const { execSync, spawn } = require('child_process');
const { readFileSync } = require('fs');

const fifo = process.argv[2];

function rarelyRunReport() {
  execSync('sleep 0.12');
}

function loadSettingsOnce() {
  return readFileSync(fifo, 'utf8');
}

const after = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  await after(400);
  rarelyRunReport();
  await after(80);
  // The writer opens the FIFO 150 ms from now, not on the loop.
  spawn('sh', ['-c', `sleep 0.15; echo ok > '${fifo}'`], { stdio: 'ignore' });
  loadSettingsOnce();
  await after(100);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

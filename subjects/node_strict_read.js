'use strict';
// Test subject for strict mode under plain `node` (no perf map): a timer
// callback's readFileSync of a small file in the page cache never leaves
// the CPU, so only --strict sees its openat and read, and names them by
// the JS function from V8's frames in the stack copy. The function is
// called three times, so V8 keeps running it in its interpreter.
//
// Timeline (about 0.6 s), all driven by timers:
//   0.00  idle 0.4 s                                     -> not reported
//   0.40  3 x loadTemplateEachTime(): readFileSync(this
//         script), 20 ms apart                           -> strict: openat,
//                                                           read, ... (file)
// Prints nothing.

const { readFileSync } = require('fs');

function loadTemplateEachTime() {
  return readFileSync(__filename, 'utf8').length;
}

const after = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  await after(400);
  for (let i = 0; i < 3; i++) {
    loadTemplateEachTime();
    await after(20);
  }
  await after(100);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

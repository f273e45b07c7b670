// Test subject: a Node loop that never sleeps in its idle wait (an
// endless chain of setImmediate keeps work always ready, so libuv polls
// with a zero timeout), and, ARGV[2] seconds in, one 200 ms CPU-bound
// callback, hog(). Prints "ready" once the loop runs; exits 1.5 s after
// the hog.
function hog(ms) {
  const end = Date.now() + ms;
  while (Date.now() < end) {}
}

function spin() {
  setImmediate(spin);
}

spin();
console.log("ready");
setTimeout(() => {
  hog(200);
  setTimeout(() => process.exit(0), 1500);
}, Number(process.argv[2]) * 1000);

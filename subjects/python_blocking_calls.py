"""Test subject: the blocking calls an asyncio application typically makes,
each in its own function, on the event loop thread.

  read_large_file   open().read() of a 32 MiB file evicted from the page
                    cache: waits for the disk in read()       -> class file
  poll_socket       a blocking socket with a timeout, as requests and
                    urllib use them: CPython waits in poll()  -> class net
  crunch            pure-Python work on the loop while an executor thread
                    does the same: the loop waits for the GIL -> class gil
  call_library      a blocking call inside an installed package
                    (subjects/site-packages/slowlib)          -> culprit in
                    the package, offender here
  list_directory    os.listdir of a cached directory: stays on the CPU,
                    seen only with --strict                   -> class stat

Each blocking line carries a `# BLOCKS: <what>` marker, so a test finds
its line number. Run with a threshold below CPython's 5 ms switch interval
to see GIL waits (each wait lasts about one interval). Prints nothing.
"""

import asyncio
import os
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "site-packages"))
import slowlib  # noqa: E402

BIG = 32 << 20


def make_cold_file(directory):
    path = os.path.join(directory, "big.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(BIG))
        f.flush()
        os.fsync(f.fileno())
        # Clean pages can be dropped: the read below goes to the disk.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path


def read_large_file(path):
    with open(path, "rb") as f:
        data = f.read()  # BLOCKS: read
    assert len(data) == BIG


def slow_server(listener):
    conn, _ = listener.accept()
    with conn:
        time.sleep(0.15)
        conn.sendall(b"x")


def poll_socket(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(1)  # BLOCKS: poll


def spin(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def crunch(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:  # BLOCKS: gil
        n += 1
    return n


def call_library():
    return slowlib.fetch()  # BLOCKS: offender


def list_directory(directory):
    return os.listdir(directory)  # BLOCKS: listdir


async def main(path, port):
    # The loop idles: its thread is now known, and blockwatch has had time
    # to find the interpreter (its Python frames) even on a slow machine.
    await asyncio.sleep(1.0)
    read_large_file(path)
    await asyncio.sleep(0.05)
    poll_socket(port)
    await asyncio.sleep(0.05)
    executor = asyncio.get_running_loop().run_in_executor(None, spin, 0.8)
    await asyncio.sleep(0.05)
    crunch(0.5)
    await executor
    call_library()
    await asyncio.sleep(0.05)
    assert "big.bin" in list_directory(os.path.dirname(path))
    await asyncio.sleep(0.2)


with tempfile.TemporaryDirectory() as d:
    big = make_cold_file(d)
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=slow_server, args=(listener,), daemon=True).start()
    asyncio.run(main(big, listener.getsockname()[1]))

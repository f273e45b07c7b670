"""A process with a handful of different blocking stacks, for the
symbolization benchmark: blockwatch records them, then the benchmark
symbolizes those stacks over and over while this process lives.

Prints "ready", then blocks in a loop until killed.
"""

import os
import tempfile
import time


def sleeper() -> None:
    time.sleep(0.003)


def stat_tree(root: str) -> None:
    for _ in range(3):
        os.stat(root)
    time.sleep(0.002)


def write_and_sync(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        os.fsync(f.fileno())


def nested(depth: int) -> None:
    if depth == 0:
        sleeper()
    else:
        nested(depth - 1)


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="bwbench-")
    path = os.path.join(tmp, "f")
    print("ready", flush=True)
    while True:
        sleeper()
        stat_tree(tmp)
        write_and_sync(path)
        nested(5)


if __name__ == "__main__":
    main()

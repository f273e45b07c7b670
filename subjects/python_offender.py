"""Test subject: an asyncio program whose blocking calls end in C libraries.

A coroutine commits to SQLite with `PRAGMA synchronous=FULL` (the commit
fsyncs inside libsqlite3), and another builds an SSL context (OpenSSL
loads the CA bundle inside libcrypto, on the CPU: a stall). The user's functions, `save_order`
and `make_client`, are what blockwatch must name as the offender, not
sqlite3PagerCommitPhaseOne or CRYPTO_strndup.

Usage: python3 python_offender.py DIRECTORY   (the SQLite file goes there)
"""

import asyncio
import os
import sqlite3
import ssl
import sys


def save_order(db: sqlite3.Connection, n: int) -> None:
    db.execute("INSERT INTO orders VALUES (?, ?)", (n, "x" * 4000))
    db.commit()


def make_client() -> ssl.SSLContext:
    # Each context loads the CA bundle (~25 ms of CPU): eight of them keep
    # the loop busy past the stall threshold.
    # (A loop, not a comprehension: before 3.12 that is a function of its own.)
    context = ssl.create_default_context()
    for _ in range(7):
        context = ssl.create_default_context()
    return context


async def main(directory: str) -> None:
    # Idle first, so the loop is known before it blocks.
    await asyncio.sleep(0.5)
    db = sqlite3.connect(os.path.join(directory, "orders.db"))
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("CREATE TABLE orders (id INTEGER, body TEXT)")
    db.commit()
    for n in range(5):
        save_order(db, n)
        await asyncio.sleep(0.02)
    for _ in range(3):
        make_client()
        await asyncio.sleep(0.02)
    db.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

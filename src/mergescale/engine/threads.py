"""Plumbing of the engines' three threads (read, compute, write): the byte budget that bounds what is in flight,
emptying a queue, and stopping the writer and aborting every output when a run fails."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from typing import Any

# How long an aborted run waits for the write in progress before deleting the outputs under it: one tensor's
# write (a few GB at most, at disk speed); a writer stuck longer (a hung network file system) is abandoned.
WRITE_FINISH_SECONDS = 30


class ByteBudget:
    """Bytes read but not yet let go of (queued, or kept by the linear folder), at most ``limit``.

    The reader waits while the budget is spent and something is still queued; with nothing queued one more
    item is always let through, so the consumer can never wait for an input the budget holds back. (The
    sliding engine takes an item when it has computed it, so there "queued" means mapped and not yet computed.)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.queued = 0
        self.cond = threading.Condition()
        self.closed = False

    def acquire(self, n: int) -> bool:
        """Reserve ``n`` bytes for one item about to be queued; False once closed."""
        with self.cond:
            while self.queued > 0 and self.used + n > self.limit and not self.closed:
                self.cond.wait()
            self.used += n
            self.queued += 1
            return not self.closed

    def taken(self) -> None:
        """The consumer took an item off the queue (its bytes stay reserved until released)."""
        with self.cond:
            self.queued -= 1
            self.cond.notify_all()

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def finish_run(outputs: Iterable[Any], write_q: queue.Queue, writer: threading.Thread, done: object,
               errors: list[BaseException]) -> None:  # fmt: skip
    """After the last result: wait for the writer to finish, re-raise its first error, else commit every output's
    sink (each appears whole, atomically)."""
    write_q.put(done)
    writer.join()
    if errors:
        raise errors[0]
    for out in outputs:
        out.sink.commit()


def abort_run(outputs: Iterable[Any], write_q: queue.Queue, writer: threading.Thread, done: object) -> None:
    """After a failure: let a write in progress finish (up to :data:`WRITE_FINISH_SECONDS`) before its file is
    closed and deleted under it, then abort every output's sink, so no output folder is left behind."""
    drain(write_q)
    if writer.is_alive():
        write_q.put(done)
        writer.join(timeout=WRITE_FINISH_SECONDS)
    for out in outputs:
        out.sink.abort()

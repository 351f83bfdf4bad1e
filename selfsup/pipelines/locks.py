"""One writer at a time on a destination in storage (`selfsup shard DEST`).

The lock is one object, `_lock.json` under DEST, created only if absent (a conditional put,
`If-None-Match: *`, on S3; `O_EXCL` on a local disk). It names its owner and holds a heartbeat
that the owner renews every HEARTBEAT_S. A second writer fails in one line naming the first; a
lock whose heartbeat is older than STALE_S, or whose owner's process on this machine is gone (it
was killed), is taken over.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import threading
import time
import uuid

from selfsup.pipelines.endpoints import StorageError
from selfsup.pipelines.storage import Store

LOCK = "_lock.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0


class Locked(StorageError):
    """Another writer holds the destination."""


def _read(store: Store) -> dict | None:
    try:
        lock = json.loads(store.read(LOCK))
    except FileNotFoundError:
        return None
    except ValueError:
        lock = None
    return lock if isinstance(lock, dict) and isinstance(lock.get("heartbeat"), (int, float)) else {"heartbeat": 0}


def _dead_here(lock: dict) -> bool:
    """The lock's owner ran on this machine and its process is gone (killed: no release)."""
    if lock.get("host") != socket.gethostname() or not isinstance(lock.get("pid"), int):
        return False
    try:
        os.kill(lock["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


class Lock:
    def __init__(self, store: Store, what: str):
        self.store, self.what = store, what
        host, pid = socket.gethostname(), os.getpid()
        self.me = {"id": uuid.uuid4().hex, "owner": f"{getpass.getuser()}@{host} pid {pid}", "host": host, "pid": pid,
                   "what": what}
        self.lost: dict | None = None  # the lock as found when another writer had taken it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="selfsup-lock")

    def _body(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": time.time()}).encode()

    def acquire(self) -> None:
        for _ in range(2):  # once more after a stale lock was removed
            if self.store.create(LOCK, self._body()):
                self._thread.start()
                return
            held = _read(self.store)
            if held is None:
                continue  # released meanwhile
            if held.get("id") == self.me["id"]:  # our own put, retried after its answer was lost
                self._thread.start()
                return
            age = time.time() - held["heartbeat"]
            if age <= STALE_S and not _dead_here(held):
                raise Locked(f"{self.store.uri} is being written by {held.get('owner', 'another writer')} "
                             f"({held.get('what', '?')}, heartbeat {max(age, 0):.0f} s ago): wait for it to end")
            self.store.delete(LOCK)  # its owner is gone: no heartbeat for STALE_S, or its process ended
        raise Locked(f"{self.store.uri}: another writer took the lock ({self.store.url(LOCK)}) as this one started")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # storage away for a while: the next beat tries again
                held = _read(self.store)
                if held is not None and held.get("id") != self.me["id"]:
                    self.lost = held
                    return
                self.store.write(LOCK, self._body())

    def check(self) -> None:
        """Raise Locked when another writer has taken the destination over."""
        if self.lost is not None:
            raise Locked(f"{self.store.uri} was taken over by {self.lost.get('owner', 'another writer')} while "
                         f"{self.what} ran (no heartbeat for {STALE_S:.0f} s?): its result is not written")

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(Exception):
            held = _read(self.store)
            if held is not None and held.get("id") == self.me["id"]:
                self.store.delete(LOCK)


@contextlib.contextmanager
def locked(store: Store, what: str):
    lock = Lock(store, what)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()

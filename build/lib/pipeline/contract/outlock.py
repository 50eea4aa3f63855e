"""One writer per output folder: a lock file naming its holder, refreshed while it runs, taken over when stale.

Two builds on one ``--out`` (a scheduler's retry while the first driver still runs, two people with one
config) would interleave manifest rewrites and leave tars that no manifest lists. The first one holds
``{out}/`` + ``schema.LOCK_FILE``, JSON with its host, pid, the pid's start time, the command and a
heartbeat it rewrites every ``heartbeat_s``; the second is refused with one line naming the holder.

A lock is stale, and is taken over with a warning, when its holder is on this host and its pid is gone
(or now belongs to another process: the start time differs), or, for a holder on another host, when its
heartbeat is older than ``stale_after_s``. Local folders are created with O_EXCL (atomic); on an object
store the lock is written and read back (a race inside that window is not excluded: do not start two
builds on one bucket prefix at the same second).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

from pipeline.contract import schema, storage
from pipeline.contract.cli import UserError


class OutputLocked(UserError):
    """--out is being written by another live command; the message names it."""


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from its holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that pid: alive, but maybe not the holder
        pass
    now = _pid_start(pid)
    return start is None or now is None or now == start


class OutputLock:
    def __init__(self, out: str, what: str = "build", stale_after_s: float = 600.0, heartbeat_s: float = 60.0):
        self.out, self.what = out, what
        self.uri = storage.join(out, schema.LOCK_FILE)
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _record(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_start": _pid_start(pid), "what": self.what,
                "command": " ".join(sys.argv)[:500], "token": self.token, "heartbeat": time.time(),
                "started": getattr(self, "_started", None) or time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.uri))
        except FileNotFoundError:
            return None
        except ValueError:  # a lock file cut by a crash mid-write: nobody can be holding it meaningfully
            return {}

    def stale_reason(self, holder: dict) -> str | None:
        """Why the lock of ``holder`` is stale (None: it is live)."""
        if not holder:
            return "the lock file is unreadable"
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == socket.gethostname():
            if not _alive(int(holder.get("pid", -1)), holder.get("pid_start")):
                return f"its process {holder.get('pid')} on this host is gone"
            return None
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (> {self.stale_after_s:.0f} s)"
        return None

    def _create(self, record: dict) -> bool:
        """Write the lock if there is none; False when one exists."""
        data = json.dumps(record, sort_keys=True).encode()
        if storage.is_remote(self.uri):
            if storage.exists(self.uri):
                return False
            storage.atomic_write(self.uri, data)
            return (self._read() or {}).get("token") == self.token
        path = self.uri[len("file://"):] if self.uri.startswith("file://") else self.uri
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def acquire(self) -> "OutputLock":
        self._started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for _ in range(3):
            if self._create(self._record()):
                self.held = True
                self._thread = threading.Thread(target=self._beat, name="out-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            holder = self._read()
            if holder is None:  # released between our try and the read
                continue
            why = self.stale_reason(holder)
            if why is None:
                age = time.time() - float(holder.get("heartbeat", 0))
                raise OutputLocked(
                    f"--out {self.out} is in use by a {holder.get('what', 'command')} on host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, since {holder.get('started')} (lock {self.uri}, heartbeat {age:.0f} s "
                    f"ago): wait for it to end; if it is dead on another host, delete the lock (a lock not refreshed "
                    f"for {self.stale_after_s:.0f} s is taken over)")
            print(f"warning: taking over the stale lock {self.uri} of host {holder.get('host')}, pid "
                  f"{holder.get('pid')} ({why})", file=sys.stderr)
            if (self._read() or {}).get("token") == holder.get("token"):  # not one another taker wrote meanwhile
                storage.remove(self.uri)
        raise OutputLocked(f"--out {self.out}: could not take the lock {self.uri} (another command took it first)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self._read() or {}).get("token") != self.token:
                    return  # taken over (we were declared stale): never write over the new holder
                storage.atomic_write(self.uri, json.dumps(self._record(), sort_keys=True).encode())
            except OSError:  # a full disk or a storage blip must not kill the build; the next beat retries
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held and (self._read() or {}).get("token") == self.token:
            storage.remove(self.uri)
        self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

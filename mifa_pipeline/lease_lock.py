"""One run per output on an object store: a conditionally created lock object with a lease.

Object stores have no link(2) and no flock, so the local `lock.OutputLock` cannot work there. Instead:
- The lock is the object `<output>/.mifa-lock.json`, created with an exclusive create
  (`Location.create`: `If-None-Match: *` on S3), holding the holder (host, pid, command, run id) and
  `lease_until`, a UTC time. Of two runs exactly one creates it; the other is refused, naming the holder.
- A live run renews its lease every `RENEW_S` seconds from a background thread (`LEASE_S` ahead).
- A lock whose lease has run out, or whose holder is a dead process on this very host, is taken over:
  deleted, then created again exclusively. Two runs taking over the same stale lock at once are told
  apart by the create: one wins. (A store without conditional deletes cannot make "delete the stale one"
  itself exclusive; the window is one request, and both losers of the create are refused.)
- `release()` deletes the lock only while it still names this run. A run that finds, when renewing,
  that its lock is gone or names another run records it in `lost`; the runner then refuses to publish.
Leases compare the clocks of different hosts: keep them NTP-synchronised (minutes of skew are tolerated).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from mifa_pipeline.lock import LOCK_NAME, Holder, OutputLockError, _command, _Corrupt, _parse, _process_start, holder_alive
from mifa_pipeline.storage import Location

LEASE_S = 300.0   # how long a lock stays valid without renewal (a crashed driver blocks its output this long)
RENEW_S = 30.0    # how often a live run renews it


class LeaseLock:
    """Exclusive lock on an object-store output for one build or re-filter (see the module docstring)."""

    def __init__(self, out: Location, purpose: str = "build", lease_s: float = LEASE_S, renew_s: float = RENEW_S):
        self.out = out
        self.purpose = purpose
        self.lease_s, self.renew_s = lease_s, renew_s
        self.run_id = uuid.uuid4().hex
        self.created_folder = False
        self.holder: Holder | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- public
    def acquire(self) -> str | None:
        """Take the lock; a message when a stale lock was taken over, else None; OutputLockError when held."""
        if self.holder is not None:
            return None
        self.created_folder = not self.out.exists()  # (one listing request, not a walk of the prefix)
        taken = None
        for _ in range(3):
            if self.out.create(LOCK_NAME, self._record()):
                break
            existing, lease_until = self._read()
            if existing is None:
                continue  # released just now
            now = time.time()
            dead_here = holder_alive(existing) is False
            if lease_until > now and not dead_here:
                until = datetime.fromtimestamp(lease_until, timezone.utc).isoformat(timespec="seconds")
                raise OutputLockError(
                    f"output {self.out} is in use by another run: {existing.describe()} (lease renewed until "
                    f"{until}). Wait for it to finish or stop it; a second build or filter into one output is "
                    f"refused. If no run is active, the lease runs out by itself {int(self.lease_s)} s after "
                    f"its last renewal, or delete {self.out.full_url(LOCK_NAME)}.")
            self.out.remove(LOCK_NAME)
            taken = (f"took over the lock of a {'dead' if dead_here else 'lapsed'} run (host {existing.host}, "
                     f"pid {existing.pid}, started {existing.started})")
        else:
            raise OutputLockError(f"could not take the lock of {self.out}: it changed hands 3 times while trying; "
                                  "other runs are starting there")
        self.holder, _ = self._read()
        if self.holder is None or self.holder.run_id != self.run_id:
            self.holder = None
            raise OutputLockError(f"output {self.out}: another run took the lock at the same moment; try again")
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="mifa-lease", daemon=True)
        self._thread.start()
        return taken

    def release(self) -> None:
        if self.holder is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            current, _ = self._read()
            if current is not None and current.run_id == self.run_id:
                self.out.remove(LOCK_NAME)
        except (OSError, OutputLockError):
            pass
        finally:
            self.holder = None

    def __enter__(self) -> "LeaseLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- internals
    def _record(self) -> bytes:
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "process_start": _process_start(os.getpid()), "command": _command(), "run_id": self.run_id,
            "purpose": self.purpose, "lease_until": time.time() + self.lease_s,
        }, indent=1).encode("utf-8")

    def _read(self) -> tuple[Holder | None, float]:
        holder, record = self._read_record()
        return holder, float(record["lease_until"]) if record else 0.0

    def _read_record(self) -> tuple[Holder | None, dict | None]:
        try:
            data = self.out.read_bytes(LOCK_NAME)
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(data)
            float(record["lease_until"])
            return _parse(data), record
        except (_Corrupt, KeyError, TypeError, ValueError):
            raise OutputLockError(
                f"the lock object {self.out.full_url(LOCK_NAME)} is unreadable, so it is unknown which run holds "
                f"{self.out}. If no build or filter is writing there, delete it and run again.") from None

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                current, record = self._read_record()
                if current is None or current.run_id != self.run_id:
                    self.lost = (f"the lock of {self.out} was {'removed' if current is None else 'taken by ' + current.describe()} "
                                 "while this run held it")
                    return
                record["lease_until"] = time.time() + self.lease_s
                self.out.write_bytes(LOCK_NAME, json.dumps(record, indent=1).encode("utf-8"))
            except Exception:  # noqa: BLE001 (a failed renewal is retried; the lease outlives several)
                continue

"""One run per output folder: an exclusive, atomic lock file in the output.

Why: two `mifa build` runs into one output corrupted each other (both wrote the same shards and
the same state), and a clean-up once deleted another run's finished build. So a build or a
re-filter takes this lock before it writes anything into its output folder and releases it at the
end; a second run into the same output is refused with a message that names the holder.

How:
- The lock is `<output>/.mifa-lock.json`, holding the holder's host, pid, process start time,
  start time (UTC), command and a run id. It is written to a private temp file first, fsynced,
  then published with `os.link(tmp, lock)`, which is atomic and fails if the lock exists: a reader
  never sees a half-written lock, and of two runs exactly one gets it. (Where hard links are not
  supported we fall back to `os.open(O_CREAT | O_EXCL)` on the lock itself, still exclusive.)
- A lock whose holder is dead on this host (pid gone, a zombie, or the pid reused by another
  process: its start time differs) is taken over. Takers-over serialise on `flock` of the stale
  lock file (the kernel drops it if a taker dies), check under it that the lock path still is that
  very file and still names that very dead run, and only then `os.rename` their own fsynced record
  over it: one atomic step, so the lock path is never empty and no third run can slip in. Of several
  runs racing for one dead lock exactly one wins; the others find the lock changed, start over and
  are refused, naming the winner. (The plain "rename the stale lock to a unique name, check it,
  delete it, create ours" is not enough: a slow taker can rename away the lock a faster one has just
  created, and then both think they hold it.)
- A holder on another host cannot be checked from here: refused, with the advice to delete the
  lock if no run is active there. A lock file that is not valid JSON is never taken over silently.
- `release()` removes the lock only while it still names this run, so a run never removes a lock
  that another run has taken since.

Storage: this relies on POSIX exclusive create (and hard links / flock for the details above) on a
local or shared POSIX filesystem (ext4, xfs, NFSv4, Lustre, ...). Object stores (S3, GCS) have no
such primitive: they get `lease_lock.LeaseLock` (a conditional create with a lease) instead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".mifa-lock.json"
_COMMAND_MAX = 200
_TRIES = 5               # acquire attempts when the lock keeps changing hands under us
_FLOCK_WAIT_S = 10.0     # how long a taker-over waits for another one's (tiny) critical section


class OutputLockError(RuntimeError):
    """The output is held by another live run (message names the holder: host, pid, started, command, and what to do)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str                    # ISO-8601 UTC
    process_start: float | None     # /proc/<pid>/stat starttime of the holder (tells pid reuse apart)
    command: str                    # e.g. "mifa build manifests/demo.yaml"
    run_id: str                     # uuid4 hex of this run

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}, command `{self.command}`"


class _Corrupt(Exception):
    pass


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """(state, starttime) of a process from /proc, or None where there is no /proc or no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'
    fields = text[text.rfind(")") + 2:].split()
    try:
        return fields[0], float(fields[19])   # field 3 = state, field 22 = starttime (clock ticks since boot)
    except (IndexError, ValueError):
        return None


def _process_start(pid: int) -> float | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _command() -> str:
    argv = list(sys.argv) or ["python"]
    argv[0] = os.path.basename(argv[0]) or argv[0]
    command = " ".join(argv)
    return command if len(command) <= _COMMAND_MAX else command[:_COMMAND_MAX - 3] + "..."


def _parse(data: bytes) -> Holder:
    try:
        raw = json.loads(data.decode("utf-8"))
        ps = raw.get("process_start")
        holder = Holder(host=str(raw["host"]), pid=int(raw["pid"]), started=str(raw["started"]),
                        process_start=None if ps is None else float(ps),
                        command=str(raw.get("command", "?")), run_id=str(raw["run_id"]))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        reason = "empty file" if not data.strip() else f"not a mifa lock: {type(exc).__name__}: {exc}"
        raise _Corrupt(reason) from None
    if not holder.run_id:
        raise _Corrupt("not a mifa lock: empty run_id")
    return holder


def _corrupt_error(path: Path, reason: str) -> OutputLockError:
    return OutputLockError(
        f"the lock file {path} is unreadable ({reason}), so it is unknown which run holds {path.parent}. "
        f"If no build or filter is writing into {path.parent}, delete {path} and run again.")


def read_holder(folder: Path) -> Holder | None:
    """The run that holds `folder`'s lock; None when there is no lock file.

    A lock file that is not a valid lock raises OutputLockError naming it (delete it if no run is active).
    """
    path = Path(folder) / LOCK_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return _parse(data)
    except _Corrupt as exc:
        raise _corrupt_error(path, str(exc)) from None


def holder_alive(holder: Holder) -> bool | None:
    """True/False whether the holder still runs on this host; None when it ran on another host (cannot tell)."""
    if holder.host != socket.gethostname():
        return None
    if holder.pid <= 0:
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass   # exists, owned by another user
    stat = _proc_stat(holder.pid)
    if stat is None:
        return True    # no /proc (not Linux) or it exited just now: assume alive, the safe side
    state, start = stat
    if state in ("Z", "X"):
        return False   # exited, not yet reaped by its parent
    if holder.process_start is not None and start != holder.process_start:
        return False   # the pid now belongs to another process
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputLock:
    """Exclusive lock on an output folder for one build or re-filter (see the module docstring)."""

    def __init__(self, folder: Path, purpose: str = "build"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose
        self.run_id = uuid.uuid4().hex
        self.created_folder = False
        self.holder: Holder | None = None       # what we wrote, while we hold the lock
        self._pid: int | None = None            # the process that acquired (a forked child must not release)

    # ---- public

    def acquire(self) -> str | None:
        """Take the lock, creating the folder if needed.

        Returns a one-line message when it took over a dead run's lock, else None. Raises
        OutputLockError when another run (or another OutputLock in this process) holds it.
        `created_folder` is True after a successful acquire that created the folder; on a refusal it
        is False, so that a refused run never removes a folder that another run now writes into.
        """
        if self.holder is not None and self._pid == os.getpid():
            return None   # this object already holds it
        try:
            self.folder.mkdir(parents=True)
            self.created_folder = True
        except FileExistsError:
            self.created_folder = False
        try:
            return self._acquire()
        except BaseException:
            self.created_folder = False
            raise

    def release(self) -> None:
        """Remove the lock file if it still names this run; idempotent, never raises on a missing file."""
        if self.holder is None or self._pid != os.getpid():
            return
        try:
            data = self.path.read_bytes()
            if _parse(data).run_id == self.run_id:
                self.path.unlink()
                _fsync_dir(self.folder)
        except (FileNotFoundError, _Corrupt):
            pass
        finally:
            self.holder = None
            self._pid = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- internals

    def _acquire(self) -> str | None:
        for _ in range(_TRIES):
            if self._create():
                return None
            holder = self._read_existing()
            if holder is None:
                continue    # released just now: try again
            alive = holder_alive(holder)
            if alive is None:
                raise OutputLockError(
                    f"output {self.folder} is locked by a run on another host ({holder.describe()}); "
                    f"this host cannot tell whether it still runs. Wait for it to finish or stop it; "
                    f"a second build or filter into one output is refused. "
                    f"If no run is active there, delete {self.path} and run again.")
            if alive:
                same = " (this same process: another OutputLock holds it)" if holder.pid == os.getpid() else ""
                raise OutputLockError(
                    f"output {self.folder} is in use by another run{same}: {holder.describe()}. "
                    f"Wait for it to finish or stop it; a second build or filter into one output is refused.")
            if self._take_over(holder):
                return (f"took over the lock of a dead run (host {holder.host}, pid {holder.pid}, "
                        f"started {holder.started})")
            # someone else changed the lock meanwhile: start over (and be refused by the winner)
        raise OutputLockError(
            f"could not take the lock of {self.folder}: it changed hands {_TRIES} times while trying; "
            f"other runs are starting there. Check {self.path} and try again.")

    def _read_existing(self) -> Holder | None:
        """The current holder; a corrupt lock is re-read briefly (a non-link writer may be mid-write), then refused."""
        for delay in (0.05, 0.2, None):
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return None
            try:
                return _parse(data)
            except _Corrupt as exc:
                if delay is None:
                    raise _corrupt_error(self.path, str(exc)) from None
                time.sleep(delay)
        return None   # unreachable

    def _write_tmp(self) -> tuple[Holder, bytes, Path]:
        """Our record, written and fsynced to a private temp file in the folder."""
        pid = os.getpid()
        holder = Holder(host=socket.gethostname(), pid=pid,
                        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        process_start=_process_start(pid), command=_command(), run_id=self.run_id)
        data = (json.dumps({**asdict(holder), "purpose": self.purpose}, indent=1) + "\n").encode()
        tmp = self.folder / f".mifa-lock.{self.run_id}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        return holder, data, tmp

    def _held(self, holder: Holder) -> bool:
        _fsync_dir(self.folder)
        self.holder, self._pid = holder, os.getpid()
        return True

    def _create(self) -> bool:
        """Create the lock exclusively with our record; False when a lock already exists."""
        holder, data, tmp = self._write_tmp()
        try:
            os.link(tmp, self.path)     # atomic, and fails if the lock exists
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if not self._create_direct(data):   # no hard links on this filesystem
                return False
        finally:
            _unlink_quietly(tmp)
        return self._held(holder)

    def _create_direct(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over(self, stale: Holder) -> bool:
        """Replace the lock of the dead run `stale` with ours if the lock still is that very one.

        Takers-over serialise on flock of the stale file (the kernel drops it if a taker dies). Under
        it we check that the lock path still is the file we locked and that it still names `stale`'s
        run, then atomically rename our temp record over it: the lock path is never empty, so no other
        run can slip in between. Whoever finds it changed returns False and starts over.
        """
        try:
            fd = os.open(self.path, os.O_RDWR)   # read-write: NFS maps flock to POSIX locks, which want it
        except FileNotFoundError:
            return False
        except PermissionError:
            raise OutputLockError(
                f"the run that held {self.folder} is dead ({stale.describe()}), but its lock {self.path} "
                f"is not writable for this user; if no run is active, delete it and run again.") from None
        try:
            deadline = time.monotonic() + _FLOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return False   # another taker is stuck mid take-over: start over (bounded by _TRIES)
                    time.sleep(0.005)
                except OSError as exc:
                    raise OutputLockError(
                        f"the run that held {self.folder} is dead ({stale.describe()}), but this filesystem "
                        f"cannot lock files ({exc.strerror}), so its lock cannot be taken over safely: "
                        f"if no run is active, delete {self.path} and run again.") from None
            try:
                if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                    return False       # already replaced by someone else
                current = _parse(os.pread(fd, 1 << 16, 0))
            except (FileNotFoundError, _Corrupt):
                return False
            if current.run_id != stale.run_id:
                return False
            holder, _, tmp = self._write_tmp()
            try:
                os.rename(tmp, self.path)   # atomic replace of the verified stale lock
            except BaseException:
                _unlink_quietly(tmp)
                raise
            return self._held(holder)
        finally:
            os.close(fd)   # releases the flock


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


"""The output lock (mifa_pipeline/lock.py) with real processes: live holders, dead holders, races."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mifa_pipeline import lock as lockmod
from mifa_pipeline.lock import LOCK_NAME, Holder, OutputLock, OutputLockError, holder_alive, read_holder

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)

HOLD = """
import sys, time
from mifa_pipeline.lock import OutputLock
lock = OutputLock(sys.argv[1])
lock.acquire()
print("ready", flush=True)
time.sleep(120)
"""

RACE = """
import json, os, sys, time
from pathlib import Path
from mifa_pipeline.lock import OutputLock, OutputLockError
folder, go, done = map(Path, sys.argv[1:4])
lock = OutputLock(folder)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
try:
    msg = lock.acquire()
except OutputLockError as exc:
    print(json.dumps({"won": False, "pid": os.getpid(), "msg": str(exc)}), flush=True)
else:
    print(json.dumps({"won": True, "pid": os.getpid(), "msg": msg}), flush=True)
    while not done.exists():
        time.sleep(0.005)
    lock.release()
"""


def spawn(code, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(proc):
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"child failed: {line!r} {proc.stderr.read()}")


def write_lock(folder: Path, **fields):
    record = {"host": socket.gethostname(), "pid": 999_999_999, "started": "2024-01-01T00:00:00+00:00",
              "process_start": None, "command": "mifa build old.yaml", "run_id": "f" * 32, **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return record


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".mifa-lock"))


def test_acquire_release_leaves_nothing_and_reports_created_folder(tmp_path):
    out = tmp_path / "a" / "b"
    lock = OutputLock(out)
    assert lock.acquire() is None
    assert lock.created_folder is True
    holder = read_holder(out)
    assert holder.pid == os.getpid() and holder.run_id == lock.run_id and holder.host == socket.gethostname()
    assert holder_alive(holder) is True
    assert leftovers(out) == [LOCK_NAME]
    assert lock.acquire() is None            # the same object: already held, fine
    lock.release()
    lock.release()                           # idempotent
    assert leftovers(out) == [] and read_holder(out) is None

    with OutputLock(out, purpose="filter") as again:
        assert again.created_folder is False
        assert json.loads((out / LOCK_NAME).read_text())["purpose"] == "filter"
    assert leftovers(out) == []


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    first = OutputLock(tmp_path / "out")
    first.acquire()
    second = OutputLock(tmp_path / "out")
    with pytest.raises(OutputLockError) as err:
        second.acquire()
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and f"host {socket.gethostname()}" in msg
    assert "a second build or filter into one output is refused" in msg
    assert second.created_folder is False
    first.release()
    assert second.acquire() is None
    second.release()


def test_live_child_refuses_then_dead_child_is_taken_over(tmp_path):
    out = tmp_path / "out"
    child = spawn(HOLD, out)
    try:
        wait_ready(child)
        with pytest.raises(OutputLockError) as err:
            OutputLock(out).acquire()
        assert f"pid {child.pid}" in str(err.value)
        assert "wait for it to finish or stop it" in str(err.value).lower()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
    lock = OutputLock(out)
    msg = lock.acquire()
    assert msg.startswith(f"took over the lock of a dead run (host {socket.gethostname()}, pid {child.pid}, started ")
    assert read_holder(out).run_id == lock.run_id
    lock.release()
    assert leftovers(out) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_killed_but_unreaped_child_counts_as_dead(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        start = lockmod._process_start(child.pid)
        holder = Holder(socket.gethostname(), child.pid, "t", start, "x", "r")
        assert holder_alive(holder) is True
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while holder_alive(holder) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder_alive(holder) is False     # a zombie until we reap it below
    finally:
        child.kill()
        child.wait()


def test_reused_pid_is_dead_when_its_start_time_differs(tmp_path):
    me = lockmod._process_start(os.getpid())
    if me is None:
        pytest.skip("needs /proc")
    write_lock(tmp_path, pid=os.getpid(), process_start=me + 1)
    lock = OutputLock(tmp_path)
    assert lock.acquire().startswith(f"took over the lock of a dead run (host {socket.gethostname()}, pid {os.getpid()}")
    lock.release()


def test_lock_from_another_host_is_refused_with_delete_advice(tmp_path):
    write_lock(tmp_path, host="gpu-node-17.example", pid=4242, command="mifa build big.yaml")
    assert holder_alive(read_holder(tmp_path)) is None
    with pytest.raises(OutputLockError) as err:
        OutputLock(tmp_path).acquire()
    msg = str(err.value)
    assert "host gpu-node-17.example" in msg and "pid 4242" in msg and "mifa build big.yaml" in msg
    assert f"if no run is active there, delete {tmp_path / LOCK_NAME}" in msg.lower()
    assert (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("content", ["", "{\"host\": \"x\", \"pi", "not json", "[1, 2]"])
def test_corrupt_lock_file_is_refused_not_taken_over(tmp_path, content):
    (tmp_path / LOCK_NAME).write_text(content)
    with pytest.raises(OutputLockError) as err:
        OutputLock(tmp_path).acquire()
    msg = str(err.value)
    assert str(tmp_path / LOCK_NAME) in msg and "unreadable" in msg and f"delete {tmp_path / LOCK_NAME}" in msg
    with pytest.raises(OutputLockError, match="unreadable"):
        read_holder(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == content


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_eight_processes_racing_for_a_dead_lock_exactly_one_wins(tmp_path):
    out, go, done = tmp_path / "out", tmp_path / "go", tmp_path / "done"
    dead = write_lock(out, process_start=-1.0, pid=os.getpid())   # our pid, another start time: dead
    procs = [spawn(RACE, out, go, done) for _ in range(8)]
    try:
        for proc in procs:
            wait_ready(proc)
        go.touch()
        results = [json.loads(proc.stdout.readline() or "null") for proc in procs]
        assert None not in results, [p.stderr.read() for p in procs]
        winners = [r for r in results if r["won"]]
        assert len(winners) == 1, results
        winner = winners[0]
        assert winner["msg"].startswith(f"took over the lock of a dead run (host {dead['host']}, pid {dead['pid']}")
        assert read_holder(out).pid == winner["pid"]
        for loser in results:
            if not loser["won"]:
                assert f"pid {winner['pid']}" in loser["msg"], loser
        done.touch()
        for proc in procs:
            assert proc.wait(timeout=10) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    assert leftovers(out) == []


def test_release_does_not_delete_a_lock_another_run_now_holds(tmp_path):
    first = OutputLock(tmp_path)
    first.acquire()
    (tmp_path / LOCK_NAME).unlink()          # e.g. someone followed the "delete the lock" advice
    second = OutputLock(tmp_path)
    second.acquire()
    first.release()
    assert read_holder(tmp_path).run_id == second.run_id
    second.release()
    assert leftovers(tmp_path) == []


def test_without_hard_links_it_falls_back_to_exclusive_create(tmp_path, monkeypatch):
    def no_link(*a, **k):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(lockmod.os, "link", no_link)
    first = OutputLock(tmp_path)
    first.acquire()
    assert read_holder(tmp_path).run_id == first.run_id and leftovers(tmp_path) == [LOCK_NAME]
    with pytest.raises(OutputLockError, match=f"pid {os.getpid()}"):
        OutputLock(tmp_path).acquire()
    first.release()
    assert leftovers(tmp_path) == []


def test_long_commands_are_shortened(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mifa", "build", "x" * 500])
    command = lockmod._command()
    assert command.startswith("mifa build xxx") and len(command) <= 200

"""Executors decide where work runs; nothing else. The local one runs everything in this process.

Two kinds of work: `map(fn, items, *args)` for plain CPU steps (checking a done record, publishing the
identity table), and `workers(spec)` for a pool of long-lived workers that hold models (one per process, so
models and judges load once) and run a method per item with a bounded number in flight. Results are the
small records the work returns; they arrive in any order. `ray_executor.py` is the Ray one. Each executor
counts the bytes of the results its caller received (`received_bytes`, pickled size): the driver's share of
the data path, which must stay a few hundred bytes per shard whatever the images weigh.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any, Protocol


@dataclass(frozen=True)
class WorkerSpec:
    """How to make a worker (`cls(*args)`), how many, and what each asks of a cluster."""

    cls: type
    args: tuple
    count: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int = 1  # calls one worker may run at once (threads), where the worker allows it


class WorkerPool(Protocol):
    def run(self, method: str, items: list[Any]) -> Iterator[tuple[Any, Any]]: ...

    def close(self) -> None: ...


class Executor(Protocol):
    name: str
    received_bytes: int

    def map(self, fn: Callable[..., Any], items: list[Any], *args: Any) -> Iterator[tuple[Any, Any]]: ...

    def workers(self, spec: WorkerSpec) -> WorkerPool: ...

    def close(self) -> None: ...


_END = object()
THREAD_PREFIX = "mifa-local"  # the local pool's threads


def calls_under_way() -> bool:
    """Whether a local pool's thread is still inside a call (after its caller stopped, e.g. on Ctrl-C)."""
    return any(t.name.startswith(THREAD_PREFIX) and t.is_alive() for t in threading.enumerate())


def pickled_size(value: Any) -> int:
    return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


class LocalPool:
    """One worker in this process, running up to `spec.concurrency` calls at once in threads (a build worker
    generates the next shard while it judges and writes the one before, as a Ray actor does); results arrive
    in completion order. When a call fails, none starts after it and the calls under way finish (their files
    are committed whole) before the error is raised. On Ctrl-C or SIGTERM nothing waits: the threads are
    daemons, so the process ends at once, as a killed run does (the unfinished shards have no done record
    and are redone by the next run)."""

    def __init__(self, spec: WorkerSpec, executor: "LocalExecutor"):
        self.worker = spec.cls(*spec.args)
        self.executor = executor
        self.concurrency = max(1, spec.concurrency)

    def run(self, method: str, items: list[Any]) -> Iterator[tuple[Any, Any]]:
        call = getattr(self.worker, method)
        calls = self._threads(call, items) if self.concurrency > 1 and len(items) > 1 else ((i, call(i)) for i in items)
        for item, result in calls:
            self.executor.received_bytes += pickled_size(result)
            yield item, result

    def _threads(self, call: Callable[[Any], Any], items: list[Any]) -> Iterator[tuple[Any, Any]]:
        todo, finished = iter(items), SimpleQueue()
        take, stop = threading.Lock(), threading.Event()

        def serve() -> None:
            while not stop.is_set():
                with take:
                    item = next(todo, _END)
                if item is _END:
                    return
                try:
                    finished.put((item, call(item), None))
                except BaseException as exc:  # noqa: BLE001 (handed to the caller's thread)
                    stop.set()
                    finished.put((item, None, exc))

        threads = [threading.Thread(target=serve, name=f"{THREAD_PREFIX}-{k}", daemon=True)
                   for k in range(min(self.concurrency, len(items)))]
        for thread in threads:
            thread.start()
        try:
            for _ in items:
                item, result, error = finished.get()
                if error is not None:
                    for thread in threads:
                        thread.join()
                    raise error
                yield item, result
        finally:
            stop.set()  # nothing new starts; on an interrupt the calls under way are not waited for

    def close(self) -> None:
        close = getattr(self.worker, "close", None)
        if close is not None:
            close()


class LocalExecutor:
    """Everything in this process (a worker's calls in up to `concurrency` threads): no Ray; the reference for
    the Ray executor."""

    name = "local"

    def __init__(self):
        self.received_bytes = 0

    def map(self, fn: Callable[..., Any], items: list[Any], *args: Any) -> Iterator[tuple[Any, Any]]:
        for item in items:
            result = fn(*args, item)
            self.received_bytes += pickled_size(result)
            yield item, result

    def workers(self, spec: WorkerSpec) -> LocalPool:
        return LocalPool(spec, self)

    def close(self) -> None:
        pass

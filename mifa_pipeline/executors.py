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
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
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


def pickled_size(value: Any) -> int:
    return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


class LocalPool:
    """One worker in this process, running up to `spec.concurrency` calls at once in threads (a build worker
    generates the next shard while it judges and writes the one before, as a Ray actor does); results arrive
    in completion order. When a call fails or the caller stops (Ctrl-C), the calls under way are let finish
    (their files are committed whole) and none is started after."""

    def __init__(self, spec: WorkerSpec, executor: "LocalExecutor"):
        self.worker = spec.cls(*spec.args)
        self.executor = executor
        self.concurrency = max(1, spec.concurrency)

    def run(self, method: str, items: list[Any]) -> Iterator[tuple[Any, Any]]:
        call = getattr(self.worker, method)
        if self.concurrency == 1:
            for item in items:
                result = call(item)
                self.executor.received_bytes += pickled_size(result)
                yield item, result
            return
        queue = list(reversed(list(enumerate(items))))
        running: dict[Future, tuple[int, Any]] = {}
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="mifa-local") as threads:
            try:
                while queue or running:
                    while queue and len(running) < self.concurrency:
                        position, item = queue.pop()
                        running[threads.submit(call, item)] = (position, item)
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in sorted(done, key=lambda f: running[f][0]):
                        _, item = running.pop(future)
                        result = future.result()
                        self.executor.received_bytes += pickled_size(result)
                        yield item, result
            finally:
                queue.clear()  # the pool's exit waits for the calls under way; nothing new starts

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

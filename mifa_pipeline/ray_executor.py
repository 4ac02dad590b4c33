"""The only module that imports Ray: CPU steps as tasks, workers as actors that hold their models.

    driver ──(shard specs)──► actor pool (num_gpus per actor; model + judges loaded once per actor)
           ◄──(done records, a few hundred bytes)── each actor writes its shards straight to the output

Each actor has at most `IN_FLIGHT` items queued (backpressure: finished work never piles up in the object
store, and nothing waits on the driver). A cluster runs this unchanged (`--ray-address` / RAY_ADDRESS);
without one, a local Ray is started and stopped.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from mifa_pipeline.executors import WorkerSpec, pickled_size

IN_FLIGHT = 2  # items queued per actor: one generating, one being judged and written (or waiting)


class TaskFailed(RuntimeError):
    """A task or actor call failed (after Ray's retries); the message names the item and the cause."""


def _name(item: Any) -> str:
    return getattr(item, "name", None) or str(item)


def _unwrap(error: Exception) -> str:
    cause = getattr(error, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(error).splitlines()[0]


def _fetch(ray, ref, item, executor: "RayExecutor") -> Any:
    """A finished task's result (counted as bytes the driver received), or TaskFailed naming the item."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as exc:
        raise TaskFailed(f"{_name(item)} failed: {_unwrap(exc)}") from None
    executor.received_bytes += pickled_size(result)
    return result


def start_ray(address: str | None) -> bool:
    """Join `address`, or start a local Ray sized to this machine. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if main:  # ray.init makes SIGTERM exit the driver at once; keep the caller's handling (stop, keep finished work)
        signal.signal(signal.SIGTERM, handler)
    return True


class RayPool:
    def __init__(self, spec: WorkerSpec, executor: "RayExecutor"):
        import ray

        self.ray = ray
        self.executor = executor
        remote = ray.remote(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=2, max_task_retries=2,
                            max_concurrency=spec.concurrency)
        self.actors = [remote(spec.cls).remote(*spec.args) for _ in range(spec.count)]

    def run(self, method: str, items: list[Any]) -> Iterator[tuple[Any, Any]]:
        ray = self.ray
        queue = list(items)
        load = [0] * len(self.actors)
        running: dict[Any, tuple[int, Any]] = {}
        while queue or running:
            for i in sorted(range(len(self.actors)), key=load.__getitem__):
                while queue and load[i] < IN_FLIGHT:
                    item = queue.pop(0)
                    running[getattr(self.actors[i], method).remote(item)] = (i, item)
                    load[i] += 1
            ready, _ = ray.wait(list(running), num_returns=1)
            i, item = running.pop(ready[0])
            load[i] -= 1
            yield item, _fetch(ray, ready[0], item, self.executor)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_task: float = 0.5,
                 check: Callable[[dict[str, float]], None] | None = None):
        """`check(cluster_resources)` runs once Ray is up (e.g. refuse a pool the cluster cannot hold)."""
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.check = check
        self.started = False
        self.ready = False
        self.received_bytes = 0

    def cluster(self) -> dict[str, float]:
        """Ray's resources; joins or starts Ray on first use (so a refused build never starts it)."""
        import ray

        if not self.ready:
            self.started = start_ray(self.address)
            self.ready = True
            if self.check is not None:
                self.check(ray.cluster_resources())
        return ray.cluster_resources()

    def map(self, fn: Callable[..., Any], items: list[Any], *args: Any) -> Iterator[tuple[Any, Any]]:
        """`fn(*args, item)` as Ray tasks of `cpus_per_task` CPUs, a bounded number in flight."""
        import ray

        if not items:
            return
        task = ray.remote(num_cpus=self.cpus_per_task, max_retries=2)(fn)
        limit = max(2, int(self.cluster().get("CPU", 1) / self.cpus_per_task))
        arg_refs = [ray.put(a) for a in args]
        queue, running = list(items), {}
        while queue or running:
            while queue and len(running) < limit:
                item = queue.pop(0)
                running[task.remote(*arg_refs, item)] = item
            ready, _ = ray.wait(list(running), num_returns=1)
            item = running.pop(ready[0])
            yield item, _fetch(ray, ready[0], item, self)

    def workers(self, spec: WorkerSpec) -> RayPool:
        self.cluster()
        return RayPool(spec, self)

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
        self.started = self.ready = False

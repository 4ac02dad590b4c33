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
from collections import deque
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


class ClusterUnreachable(RuntimeError):
    """--ray-address names no running cluster: one line saying what was tried and how to check."""


def _probe(address: str, timeout: float = 5.0) -> None:
    """Refuse an address nothing answers at, before ray.init prints pages of connection warnings."""
    import socket

    text = address.removeprefix("ray://")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"--ray-address {address!r}: expected HOST:PORT (the head node's GCS address, "
                                 "default port 6379), 'auto' (a cluster started on this machine) or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterUnreachable(
            f"--ray-address {address}: no Ray cluster answers there (a TCP connection to {host}:{port} failed within "
            f"{timeout:g} s: {exc.strerror or exc}); check that the head node runs (`ray status --address "
            f"{host}:{port}` on a cluster machine), the address and port, and firewalls; or omit --ray-address "
            "to start a local Ray") from None


def start_ray(address: str | None) -> bool:
    """Join `address`, or start a local Ray sized to this machine. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    if address and address != "auto":
        _probe(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # "local": a new Ray of our own, never one that another user started on this machine (which
            # ray.init() would join through /tmp/ray/ray_current_cluster); --ray-address auto joins that
            ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)
    except ConnectionError as exc:
        raise ClusterUnreachable(f"--ray-address {address}: could not join a Ray cluster ({str(exc).splitlines()[0][:200]}); "
                                 "for 'auto', start one on this machine first (`ray start --head`), or omit "
                                 "--ray-address to start a local Ray") from None
    if main:  # ray.init makes SIGTERM exit the driver at once; keep the caller's handling (stop, keep finished work)
        signal.signal(signal.SIGTERM, handler)
    return True


PLACEMENT_TIMEOUT_S = 600.0  # how long a pool with no live worker waits for the cluster to place one


class RayPool:
    """Actors that hold their models. A worker lost with its node (or a crashed one) is replaced where the
    cluster has room, and its queued items go to the workers still alive: the build goes on, same bytes."""

    def __init__(self, spec: WorkerSpec, executor: "RayExecutor"):
        import ray

        self.ray = ray
        self.spec = spec
        self.executor = executor
        self.remote = ray.remote(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=0, max_task_retries=0,
                                 max_concurrency=spec.concurrency)(spec.cls)
        self.replacements = 2 * spec.count  # as many restarts as Ray's max_restarts=2 per actor gave before
        self.starting: dict[Any, Any] = {}  # ready ref -> actor being placed and constructed
        self.live: list[Any] = []
        self.lost = 0
        for _ in range(spec.count):
            self._start()

    def _start(self) -> None:
        actor = self.remote.remote(*self.spec.args)
        self.starting[actor.__ray_ready__.remote()] = actor

    def _lose(self, actor: Any, why: str) -> None:
        if actor in self.live:
            self.live.remove(actor)
            self.lost += 1
            self.ray.kill(actor, no_restart=True)
            if self.replacements > 0:
                self.replacements -= 1
                self._start()
            print(f"mifa: a worker was lost ({why}); its work goes to the others", flush=True)

    def run(self, method: str, items: list[Any]) -> Iterator[tuple[Any, Any]]:
        ray = self.ray
        queue = deque(items)
        load: dict[int, int] = {}
        running: dict[Any, tuple[Any, Any]] = {}
        while queue or running:
            for actor in sorted(self.live, key=lambda a: load.get(id(a), 0)):
                while queue and load.get(id(actor), 0) < IN_FLIGHT:
                    item = queue.popleft()
                    running[getattr(actor, method).remote(item)] = (actor, item)
                    load[id(actor)] = load.get(id(actor), 0) + 1
            if not running and not self.live and not self.starting:
                raise TaskFailed(f"every worker died ({self.lost} lost); {_name(queue[0])} and {len(queue) - 1} more "
                                 "not done; see the Ray logs (`ray logs`) for why")
            ready, _ = ray.wait([*running, *self.starting], num_returns=1,
                                timeout=None if running else PLACEMENT_TIMEOUT_S)
            if not ready:
                raise TaskFailed(f"no worker could be placed for {PLACEMENT_TIMEOUT_S:g} s (each asks {self.spec.num_cpus:g} "
                                 f"CPU and {self.spec.num_gpus:g} GPU); check `ray status` and resources.* in the manifest")
            ref = ready[0]
            if ref in self.starting:
                actor = self.starting.pop(ref)
                try:
                    ray.get(ref)
                    self.live.append(actor)
                except ray.exceptions.RayError as exc:
                    if not self.live and not self.starting and not running:
                        raise TaskFailed(f"a worker could not start: {_unwrap(exc)}") from None
                continue
            actor, item = running.pop(ref)
            load[id(actor)] -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the worker died (its node left, OOM, crash)
                self._lose(actor, f"{_name(item)}: {type(exc).__name__}")
                queue.appendleft(item)
                continue
            except ray.exceptions.RayError as exc:
                raise TaskFailed(f"{_name(item)} failed: {_unwrap(exc)}") from None
            self.executor.received_bytes += pickled_size(result)
            yield item, result

    def close(self) -> None:
        for actor in [*self.live, *self.starting.values()]:
            self.ray.kill(actor)
        self.live, self.starting = [], {}


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

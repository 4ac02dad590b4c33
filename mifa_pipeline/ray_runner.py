"""The only module that imports Ray: CPU stages as tasks, generation as an actor pool holding the model.

    expand_unit task ─► GenerationWorker actor (num_gpus per actor) ─► filter_unit task ─► driver commits

Each actor keeps up to `IN_FLIGHT` units queued, so it never waits for the driver: while one unit is
generated, the next one's prompts are ready and the previous one is filtered on CPU. Object refs pass
straight from task to actor to task; only filtered, encoded units come back to the driver. A cluster
runs this unchanged (`--ray-address` / RAY_ADDRESS); without one, a local Ray is started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mifa_pipeline.plan import WorkUnit
from mifa_pipeline.refilter import RefilterMixin
from mifa_pipeline.runner import BuildError, BuildRunner, PreparedBuild
from mifa_pipeline.work import GenerationWorker, UnitState, expand_unit, filter_unit

if TYPE_CHECKING:
    import ray

IN_FLIGHT = 2  # units queued per generation actor


def start_ray(address: str | None) -> bool:
    """Join `address`, or start a local Ray sized to this machine. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    return True


def check_resources(build: PreparedBuild) -> None:
    """Refuse a pool that cannot be scheduled, instead of hanging (the 2-CPU actor-pool deadlock)."""
    import ray

    r = build.manifest.resources
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    need_cpus = r.generation_workers * r.cpus_per_worker + r.filter_cpus
    if need_cpus > cpus:
        raise BuildError(
            f"resources: {r.generation_workers} generation worker(s) x cpus_per_worker {r.cpus_per_worker} "
            f"+ filter_cpus {r.filter_cpus} = {need_cpus} CPUs, but the Ray cluster has {cpus:g}; "
            "lower resources.generation_workers or resources.cpus_per_worker"
        )
    need_gpus = r.generation_workers * r.gpus_per_worker
    if need_gpus > gpus:
        raise BuildError(
            f"resources: {r.generation_workers} generation worker(s) x gpus_per_worker {r.gpus_per_worker} "
            f"= {need_gpus} GPUs, but the Ray cluster has {gpus:g}"
        )


def _unwrap(error: Exception) -> str:
    cause = getattr(error, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(error).splitlines()[0]


class RayRunner(BuildRunner):
    name = "ray"

    def __init__(self, build: PreparedBuild, progress: bool | None = None, ray_address: str | None = None):
        super().__init__(build, progress)
        self.ray_address = ray_address

    def execute(self, units: list[WorkUnit]) -> Iterator[UnitState]:
        if not units:
            return
        import ray

        started = start_ray(self.ray_address)
        try:
            yield from self._execute(ray, units)
        finally:
            if started:
                ray.shutdown()

    def map_units(self, fn, units: list[WorkUnit], *args) -> Iterator[object]:
        """`fn(*args, unit)` as Ray tasks of `resources.filter_cpus`, a bounded number in flight."""
        if not units:
            return
        import ray

        started = start_ray(self.ray_address)
        try:
            cpus = self.manifest.resources.filter_cpus
            task = ray.remote(num_cpus=cpus, max_retries=2)(fn)
            limit = max(2, int(ray.cluster_resources().get("CPU", 1) / cpus))
            queue, running = list(units), {}
            while queue or running:
                while queue and len(running) < limit:
                    unit = queue.pop(0)
                    running[task.remote(*args, unit)] = unit
                ready, _ = ray.wait(list(running), num_returns=1)
                unit = running.pop(ready[0])
                try:
                    yield ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    raise BuildError(f"{unit.name} failed: {_unwrap(exc)}") from None
        finally:
            if started:
                ray.shutdown()

    def _execute(self, ray: "ray", units: list[WorkUnit]) -> Iterator[UnitState]:
        check_resources(self.build)
        m, r = self.manifest, self.manifest.resources
        actor_cls = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                               max_restarts=2, max_task_retries=2)(GenerationWorker)
        expand = ray.remote(num_cpus=r.filter_cpus, max_retries=2)(expand_unit)
        filt = ray.remote(num_cpus=r.filter_cpus, max_retries=2)(filter_unit)
        actors = [actor_cls.remote(m) for _ in range(r.generation_workers)]
        try:
            resolutions = ray.get([a.setup.remote() for a in actors])
        except ray.exceptions.RayError as exc:
            raise BuildError(f"generation worker failed to start: {_unwrap(exc)}") from None
        resolution = resolutions[0]

        queue = list(units)
        load = {i: 0 for i in range(len(actors))}
        generating: dict["ray.ObjectRef", tuple[int, WorkUnit]] = {}
        filtering: dict["ray.ObjectRef", WorkUnit] = {}
        spi = m.identities.samples_per_identity
        while queue or generating or filtering:
            # keep every actor's queue full
            for i in sorted(load, key=load.get):
                while queue and load[i] < IN_FLIGHT:
                    unit = queue.pop(0)
                    ref = actors[i].process.remote(expand.remote(m, unit))
                    generating[ref] = (i, unit)
                    load[i] += 1
            ready, _ = ray.wait([*generating, *filtering], num_returns=1, fetch_local=False)
            ref = ready[0]
            if ref in generating:
                i, unit = generating.pop(ref)
                load[i] -= 1
                n = len(unit.identities) * spi
                self.advance("prompts", n)
                self.advance("identities", len(unit.identities))
                self.advance("generate", n)
                filtering[filt.remote(m, ref, resolution)] = unit
            else:
                unit = filtering.pop(ref)
                try:
                    state = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise BuildError(f"{unit.name} failed: {_unwrap(exc)}") from None
                self.advance("filter", len(state.samples))
                yield state


class RayRefilterRunner(RefilterMixin, RayRunner):
    """`mifa filter` on Ray: one CPU task per unit (re-scoring where a judge changed, then re-deciding)."""

"""`mifa`: build, inspect and verify MIFA-style data sets.

Heavy modules (torch, Ray, the model) are imported inside commands, so `mifa --help` answers at once.
User errors end in one red message and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build MIFA-style face data sets (images + AU labels) with MAUGen, as Ray-distributed stages.")
from mifa_pipeline.maugen.cli import model_app  # noqa: E402  (cheap: the model package loads lazily)
from mifa_pipeline.training.cli import train_app  # noqa: E402  (cheap: training modules load in the command)

app.add_typer(model_app, name="model")
app.add_typer(train_app, name="train", help="Train MAUGen on data sets in mifa's shard format (e.g. `mifa teacher`).")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ManifestArg = Annotated[Optional[Path], typer.Argument(help="build manifest (YAML); omit for the built-in defaults")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a field: dotted.key=value (repeatable)")]
OutOpt = Annotated[Optional[str], typer.Option("--out", "-o", help="output folder or URL: s3://bucket/prefix, gs://, az://, "
                                                                 "memory:// (overrides the manifest's `output`)")]
LocationArg = Annotated[str, typer.Argument(help="a finished build: a folder or a URL (s3://bucket/prefix, ...)")]
AllowEmptyOpt = Annotated[bool, typer.Option(
    "--allow-empty", help="go on although a filter threshold drops every sample (e.g. filter.min_pixel_std=127.5): "
    "the data set will be empty")]


def fail(message: str, code: int = 2) -> typer.Exit:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(manifest: Optional[Path], overrides: Optional[list[str]], output: Optional[str]):
    from mifa_pipeline.config import ManifestError, load_manifest

    try:
        return load_manifest(manifest, overrides or [], output)
    except ManifestError as exc:
        raise fail(str(exc)) from None


@app.command()
def build(
    manifest: ManifestArg = None,
    out_dir: OutOpt = None,
    overrides: SetOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="replace an existing build in the output folder")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the resolved plan and exit")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", envvar="RAY_ADDRESS",
                                                       help="Ray cluster to join; default: start a local one")] = None,
    runner: Annotated[str, typer.Option(help="'ray' (default) or 'local' (one process, no Ray; for debugging)")] = "ray",
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="progress bars (default: on a terminal)")] = None,
    allow_empty: AllowEmptyOpt = False,
) -> None:
    """Build a data set: prompts -> identities -> MAUGen generation -> filtering -> WebDataset shards.

    Resumes an interrupted build in the same output folder; refuses a folder holding another build. Checks
    everything it can first (manifest, model, judges, every reference image, output folder) and writes
    nothing when one fails (exit 2).
    """
    from mifa_pipeline.runner import BuildError, prepare

    m = _load(manifest, overrides, out_dir)
    if runner not in ("ray", "local"):
        raise fail(f"--runner {runner!r}: expected 'ray' or 'local'")
    try:
        prepared = prepare(m, fresh=fresh, allow_empty=allow_empty)
    except BuildError as exc:
        raise fail(str(exc)) from None
    if dry_run:
        _print_plan(prepared, runner)
        return
    if prepared.state == "complete":
        out.print(f"{prepared.out}: already complete (fingerprint {prepared.fingerprint[:12]}); nothing to do")
        return
    from mifa_pipeline.runner import Runner, make_executor

    result = _run(lambda: Runner(prepared, make_executor(runner, m, ray_address), progress=progress).run(), prepared.out)
    _summary(result, "mifa build summary")
    c = result.manifest
    skipped = c["counts"].get("skipped_references")
    if skipped:
        err.print(f"[yellow]note:[/] {skipped} reference image(s) without a single face were skipped "
                  f"(listed in {prepared.out.full_url('manifest.json')} under skipped_references)", highlight=False)
    _warn_if_empty(c)
    out.print(f"{result.state}: {prepared.out} ({c['counts']['kept_samples']} samples, fingerprint {c['fingerprint'][:12]})")


def _warn_if_empty(content: dict) -> None:
    """A data set that kept nothing is said so, with why (the drop reasons), not only counted."""
    if content["counts"]["kept_samples"] == 0 and content["counts"]["planned_samples"]:
        reasons = {}
        for stage in content["stages"].values():
            for reason, n in stage.get("dropped", {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
        why = ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items())) or "none recorded"
        err.print(f"[yellow]warning:[/] every sample was dropped ({why}); the data set is empty", highlight=False)


def _resume_hint(folder) -> str:
    """What is kept after a failure, said as it is: finished tasks (if any), and how to go on."""
    from mifa_pipeline.done import any_done

    try:
        done = any_done(folder)
    except OSError:
        done = False
    if done:
        return f"finished work in {folder} is kept; run the same command again to resume"
    return "nothing was finished, so nothing is kept; run the same command again to start over"


def _end_now_if_shards_under_way(code: int) -> None:
    """A stopped local run whose threads are still inside a shard ends here, as a killed run does (those shards
    have no done record and are redone on resume): the threads cannot be stopped, and an interpreter that
    finalizes under them can abort in their C code (exit 134 instead of 130)."""
    import os
    import sys

    from mifa_pipeline.executors import calls_under_way

    if calls_under_way():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run(work, folder):
    """Run a build or filter; every failure a user can meet ends in one message and a non-zero exit."""
    from mifa_pipeline.done import CommitConflict, DamagedSource
    from mifa_pipeline.ray_executor import ClusterUnreachable, TaskFailed
    from mifa_pipeline.runner import BuildError
    from mifa_pipeline.stages.identities import ReferenceImageError

    try:
        return work()
    except ClusterUnreachable as exc:
        raise fail(str(exc)) from None
    except (BuildError, TaskFailed, ReferenceImageError, DamagedSource, CommitConflict) as exc:
        raise fail(f"{exc}\n({_resume_hint(folder)})") from None
    except KeyboardInterrupt:
        stopped = fail(f"interrupted; {_resume_hint(folder)}", 130)
        _end_now_if_shards_under_way(130)
        raise stopped from None
    except OSError as exc:
        where = exc.filename or folder
        hint = "free some space" if exc.errno == 28 else "fix it"
        raise fail(f"{where}: {exc.strerror or exc} (errno {exc.errno}); {hint} ({_resume_hint(folder)})") from None


def _summary(result, title: str) -> None:
    from mifa_pipeline.progress import summary_table

    c = result.manifest
    out.print(summary_table(c["stages"], c["shards"], result.wall_seconds, title))


def _print_plan(prepared, runner: str) -> None:
    m, plan = prepared.manifest, prepared.plan
    r = m.resources
    info = {
        "output": str(m.output),
        "state": prepared.state,
        "fingerprint": prepared.fingerprint,
        "identities": m.identities.count,
        "samples_per_identity": m.identities.samples_per_identity,
        "planned_samples": plan.total_samples,
        "identity_blocks": len(plan.blocks),
        "shards": len(plan.shards),
        "samples_per_shard": m.writer.samples_per_shard,
        "stages": ["prompts", "identities", "duplicates", "generate", "filter", "write"],
        "model": m.model.checkpoint,
        "sampler": m.sampler.model_dump(),
        "runner": runner,
        "resources": {"generation_workers": r.generation_workers, "gpus_per_worker": r.gpus_per_worker,
                      "cpus_per_worker": r.cpus_per_worker, "filter_cpus": r.filter_cpus,
                      "gpus_total": r.generation_workers * r.gpus_per_worker},
    }
    out.print_json(json.dumps(info))


@app.command()
def inspect(folder: LocationArg) -> None:
    """Summarise a build: counts, drop reasons, AU and demographic distributions, every score's percentiles
    over all planned samples (kept and dropped), and per thresholded score a table of value -> samples dropped."""
    from mifa_pipeline.inspect import summarise

    console = out if out.is_terminal else Console(soft_wrap=True, width=160)  # wide tables stay whole in a file
    try:
        summarise(folder, console)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None


@app.command()
def report(
    folder: Annotated[str, typer.Argument(help="a finished build or filter version: folder or URL")],
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="HTML file to write; default: FOLDER-report.html beside it")] = None,
) -> None:
    """Write one self-contained HTML page (pictures and plots inline, opens from disk) for curators.

    Sample grids per identity and per expression (requested / generated / estimated AUs under each picture),
    kept and dropped samples side by side, AU histograms and agreement, demographic balance, identity
    similarity, drop reasons, samples kept vs each threshold, and the version lineage.
    """
    import time

    from mifa_pipeline.report import ReportError, write_report

    start = time.perf_counter()
    try:
        path = write_report(folder, out_file)
    except (OSError, ValueError, ReportError) as exc:
        raise fail(str(exc)) from None
    out.print(f"{path} ({path.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s)")


@app.command()
def verify(folder: LocationArg) -> None:
    """Re-hash every file and check fingerprint, keys, counts, sidecar rows and the index against the run manifest."""
    from mifa_pipeline.verify import verify as run_verify

    try:
        problems = run_verify(folder)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    if problems:
        for p in problems:
            err.print(f"[red]✗[/] {p}", highlight=False)
        raise fail(f"{folder}: {len(problems)} problem(s) found", 1)
    out.print(f"[green]✓[/] {folder}: every file, key, count, sidecar row and the fingerprint match the run manifest")


@app.command("filter")
def filter_(
    parent: Annotated[str, typer.Argument(help="a finished build (or filtered version) to re-filter: folder or URL")],
    out_dir: Annotated[Optional[str], typer.Option("--out", "-o", help="new version's folder or URL; default: PARENT-vVERSION")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="filter.* field: dotted.key=value (repeatable)")] = None,
    models: Annotated[Optional[Path], typer.Option("--models", help="folder of face model files (sets filter.models_dir)")] = None,
    version: Annotated[Optional[str], typer.Option(help="new data set version; default: parent's minor + 1")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="replace an existing version in the output folder")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", envvar="RAY_ADDRESS")] = None,
    runner: Annotated[str, typer.Option(help="'ray' (default) or 'local'")] = "ray",
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress")] = None,
    allow_empty: AllowEmptyOpt = False,
) -> None:
    """Re-run the filter stage over an existing build into a NEW data set version, regenerating nothing.

    Threshold-only changes reuse the stored scores and run no model; a changed judge (detector, embedder,
    AU estimator or their files) re-scores only what it produces. The parent version stays intact.
    """
    from mifa_pipeline.refilter import prepare_refilter, run_refilter
    from mifa_pipeline.runner import BuildError

    if runner not in ("ray", "local"):
        raise fail(f"--runner {runner!r}: expected 'ray' or 'local'")
    sets = [*(overrides or []), *([f"filter.models_dir={models}"] if models else [])]
    try:
        prepared = prepare_refilter(parent, sets, out_dir, version, fresh, allow_empty)
    except BuildError as exc:
        raise fail(str(exc)) from None
    target = prepared.out
    if prepared.note:
        out.print(f"note: {prepared.note}", highlight=False)
    if prepared.state == "complete":
        out.print(f"{target}: already complete (fingerprint {prepared.fingerprint[:12]}); nothing to do")
        return
    result = _run(lambda: run_refilter(prepared, runner, progress, ray_address), target)
    c = result.manifest
    _summary(result, f"mifa filter summary: {parent} {prepared.parent_manifest['dataset']['version']} -> "
                     f"{c['dataset']['name']} {c['dataset']['version']}")
    _warn_if_empty(c)
    rescored = c["stages"]["filter"].get("rescored_judges") or "none (scores reused)"
    out.print(f"{result.state}: {target} = {c['dataset']['name']} {c['dataset']['version']} "
              f"({c['counts']['kept_samples']} samples; parent {parent}; re-scored judges: {rescored})")


@app.command()
def schema(
    sample: Annotated[bool, typer.Option("--sample", help="the published sample schema (KEY.json) instead")] = False,
) -> None:
    """Print the JSON schema of the build manifest, or with --sample that of each sample's KEY.json."""
    if sample:
        from mifa_pipeline.sample_schema import json_schema as sample_schema

        out.print_json(json.dumps(sample_schema()))
        return
    from mifa_pipeline.config import json_schema

    out.print_json(json.dumps(json_schema()))


@app.command()
def teacher(
    out_dir: Annotated[str, typer.Argument(help="output of the teacher data set: a folder or a URL (s3://bucket/prefix, ...)")],
    identities: Annotated[int, typer.Option("--identities", "-n", help="number of identities")] = 100,
    per_identity: Annotated[int, typer.Option("--per-identity", "-m", help="samples per identity")] = 20,
    resolution: Annotated[int, typer.Option(help="image size in pixels")] = 128,
    overrides: SetOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="replace an existing data set in the output folder")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", envvar="RAY_ADDRESS")] = None,
    runner: Annotated[str, typer.Option(help="'ray' (default) or 'local'")] = "ray",
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress")] = None,
    allow_empty: AllowEmptyOpt = False,
) -> None:
    """Write a labelled teacher data set: procedural FACS faces with exact AU labels, in the build's shard format.

    It is a build whose generator is the procedural renderer (model.checkpoint=teacher), so it resumes,
    verifies and reads exactly like a MAUGen build; `--set` changes any other field (e.g. seed, prompts).
    """
    defaults = [
        "model.checkpoint=teacher", "dataset.name=mifa-teacher", f"identities.count={identities}",
        f"identities.samples_per_identity={per_identity}", f"sampler.resolution={resolution}",
        "writer.samples_per_shard=1000", "resources.identities_per_unit=16", "sampler.batch_size=64",
    ]
    build(None, out_dir, [*defaults, *(overrides or [])], fresh, False, ray_address, runner, progress, allow_empty)
    from mifa_pipeline.stages.teacher import write_identity_attributes

    out.print(f"identity shape attributes: {write_identity_attributes(out_dir)}")


if __name__ == "__main__":  # `python -m mifa_pipeline.cli`, same as the `mifa` command
    app()

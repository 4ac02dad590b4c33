"""``mifa model ...``: import the official MAUGen files into our folder format, and describe a folder.

The project CLI mounts ``model_app``. User errors print one clear message and exit with code 2, no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

model_app = typer.Typer(help="MAUGen checkpoints: import the official files, inspect a model folder, store it in half precision.",
                        no_args_is_help=True)


def _quiet_libraries() -> None:
    """No per-file progress bars from diffusers/transformers in CLI output."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@model_app.command("import-official")
def import_official_cmd(
    base: Path = typer.Option(..., "--base", help="diffusers SD-1.5 inpainting folder (unet, vae, text_encoder, tokenizer, scheduler)"),
    unet_state: Path = typer.Option(..., "--unet-state", help="official CustomUNet state dict (.bin/.pt or .safetensors)"),
    au_cue: Path = typer.Option(..., "--au-cue", help="official AU cue tensor [1, A, 768]"),
    msid: Path = typer.Option(..., "--msid", help="MSID identity-encoder state dict"),
    mapping: Path = typer.Option(..., "--mapping", help="IMG2TEXTwithEXP mapping state dict"),
    out: Path = typer.Option(..., "--out", help="output folder (our format)"),
    au_names: Optional[str] = typer.Option(None, "--au-names", help="comma-separated AU list of the cue rows (default DISFA-12)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into a non-empty output folder"),
    preset: str = typer.Option("full", "--preset", help="label/identity sizes: full (official) or tiny (tests)"),
) -> None:
    """Check every official file strictly (keys and shapes) and write a MAUGen folder."""
    from .checkpoints import CheckpointError, import_official, save_folder

    _quiet_libraries()
    if out.exists() and any(out.iterdir()) and not overwrite:
        _fail(f"{out}: output folder is not empty (use --overwrite)")
    names = [a.strip() for a in au_names.split(",") if a.strip()] if au_names else None
    try:
        model = import_official(base, unet_state, au_cue, msid, mapping, au_names=names, preset=preset)
    except CheckpointError as exc:
        _fail(str(exc))
    save_folder(model, out)
    counts = model.parameter_counts()
    typer.echo(f"wrote {out}: {len(model.au_names)} AUs, {model.resolution}px, {sum(counts.values()):,} parameters")


@model_app.command("info")
def info_cmd(
    path: Path = typer.Argument(..., help="a MAUGen folder written by import-official or save_pretrained"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Components, AU list, parameter counts and the sha256 of every file of a MAUGen folder."""
    from .checkpoints import CheckpointError, folder_info

    try:
        info = folder_info(path)
    except CheckpointError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{info['path']}  ({info['format']}, {info['resolution']} px)")
    typer.echo(f"AUs ({len(info['au_names'])}): {', '.join(info['au_names'])}")
    typer.echo("components (stored tensor elements):")
    for comp in info["components"]:
        typer.echo(f"  {comp:<18} {info['parameters'].get(comp, 0):>14,}")
    typer.echo(f"  {'total':<18} {info['total_parameters']:>14,}")
    typer.echo("sha256:")
    for rel, digest in info["sha256"].items():
        typer.echo(f"  {digest}  {rel}")


@model_app.command("store-half")
def store_half_cmd(
    src: Path = typer.Argument(..., help="a MAUGen folder"),
    dst: Path = typer.Argument(..., help="new folder: the same model with float32 tensors stored as float16"),
) -> None:
    """Copy a MAUGen folder with its float32 weights stored as float16 (half the size; loads as float32)."""
    from .checkpoints import CheckpointError, store_half

    try:
        sizes = store_half(src, dst)
    except CheckpointError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {dst}: {sizes['bytes_before']:,} -> {sizes['bytes_after']:,} bytes")


@model_app.command("average")
def average_cmd(
    a: Path = typer.Argument(..., help="a MAUGen folder (its dtype, files and counters are kept)"),
    b: Path = typer.Argument(..., help="a MAUGen folder of the same architecture and tokenizer"),
    dst: Path = typer.Argument(..., help="new folder: (1 - weight) * A + weight * B"),
    weight: float = typer.Option(0.5, "--weight", help="B's share, in [0, 1]"),
) -> None:
    """Average two MAUGen folders tensor by tensor (e.g. a fine-tuned model with the one it started from)."""
    from .checkpoints import CheckpointError, average_folders

    try:
        n = average_folders(a, b, dst, weight)
    except CheckpointError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {dst}: {n} tensors differed and were averaged, weight of B {weight}")

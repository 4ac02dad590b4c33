"""``mifa train``: a typer app whose root command trains MAUGen (mount with ``app.add_typer(train_app, name="train")``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

train_app = typer.Typer(invoke_without_command=True, add_completion=False, pretty_exceptions_enable=False,
                        context_settings={"allow_interspersed_args": True}, subcommand_metavar="",
                        help="Train MAUGen on labelled data sets in the build's shard format.")


@train_app.callback(invoke_without_command=True)
def train(
    data: Annotated[list[str], typer.Argument(help="data sets: folders or URLs (mifa build / mifa teacher output)")],
    out: Annotated[Path, typer.Option("--out", help="output folder: checkpoints/, model/, train_log.jsonl, validation/, latent_cache.safetensors")],
    base: Annotated[Optional[Path], typer.Option("--base", help="diffusers SD-1.5 inpainting folder to start from")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="mifa MAUGen checkpoint folder to start from")] = None,
    vae: Annotated[Optional[Path], typer.Option("--vae", help="a trained VAE (mifa model folder or diffusers vae folder): skip the VAE phase; with --init: move that model to this VAE at --resolution (where its latents differ, the UNet's latent-facing convolution weights start afresh; every other weight is kept)")] = None,
    config: Annotated[str, typer.Option("--config", help="tiny | small (the demo model) | full; with --base: label-branch sizes")] = "tiny",
    resolution: Annotated[int, typer.Option("--resolution", help="training image size (pixels)")] = 64,
    steps: Annotated[int, typer.Option("--steps", help="MAUGen training steps")] = 1000,
    vae_steps: Annotated[Optional[int], typer.Option("--vae-steps", help="VAE steps first (default: max(100, steps/8) when no VAE is given, else 0)")] = None,
    decoder_steps: Annotated[int, typer.Option("--decoder-steps", help="VAE-decoder-only steps after the main phase (sharper images, same latents)")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    lr: Annotated[float, typer.Option("--lr")] = 5e-4,
    vae_lr: Annotated[float, typer.Option("--vae-lr")] = 1e-3,
    warmup: Annotated[int, typer.Option("--warmup")] = 100,
    ema: Annotated[float, typer.Option("--ema", help="EMA decay of the saved weights (0: off)")] = 0.999,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = 500,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints")] = 2,
    log_every: Annotated[int, typer.Option("--log-every")] = 10,
    validate_every: Annotated[int, typer.Option("--validate-every", help="0: only at the end")] = 0,
    val_data: Annotated[Optional[list[str]], typer.Option("--val-data", help="held-out data set(s) for validation: folders or URLs")] = None,
    val_identities: Annotated[int, typer.Option("--val-identities", help="identities held out of DATA when no --val-data")] = 4,
    val_samples: Annotated[int, typer.Option("--val-samples")] = 8,
    val_steps: Annotated[int, typer.Option("--val-steps")] = 20,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale")] = 7.5,
    train_text_encoder: Annotated[Optional[bool], typer.Option("--train-text-encoder/--freeze-text-encoder", help="default: train from scratch, freeze from --base/--init")] = None,
    identity_input: Annotated[Optional[str], typer.Option("--identity-input", help="what the identity encoder reads: frame (the whole reference) | mask_region (only the region the model redraws); default: the model's, or the preset's")] = None,
    occurrence_threshold: Annotated[float, typer.Option("--occurrence-threshold", help="occurrence label = intensity >= this")] = 2.0,
    occ_gamma: Annotated[float, typer.Option("--occ-gamma")] = 2.0,
    int_gamma: Annotated[float, typer.Option("--int-gamma", help="FocalMSE gamma (0: plain MSE)")] = 2.0,
    w_occ: Annotated[float, typer.Option("--w-occ")] = 1.0,
    w_int: Annotated[float, typer.Option("--w-int")] = 1.0,
    aux_weight: Annotated[float, typer.Option("--aux-weight", help="deep supervision weight of the earlier levels (0: off)")] = 0.5,
    w_mrl: Annotated[float, typer.Option("--w-mrl", help="MRL alignment weight (0: off)")] = 0.05,
    mrl_colour_jitter: Annotated[float, typer.Option("--mrl-colour-jitter", help="colour gain/offset range applied to the two views of the identity MRL term, so it must match face shape, not colours (0: off)")] = 0.0,
    identity_attribute_weight: Annotated[float, typer.Option("--identity-attribute-weight", help="train the <ID> words to predict each identity's numbers in the data's identity_attributes.parquet (`mifa teacher` writes its face-shape parameters there), so they carry the face's shape, not only its colours (0: off)")] = 0.0,
    identity_image_weight: Annotated[float, typer.Option("--identity-image-weight", help="with --identity-attribute-weight: the clean image the UNet predicts at each step, decoded, must show those attributes as the identity side (held fixed) reads them, so the UNet draws the shape the <ID> words carry (0: off)")] = 0.0,
    vae_expression_weight: Annotated[float, typer.Option("--vae-expression-weight", help="VAE and decoder phases: pixels an AU moved (where the face differs from its neutral reference) weigh 1 + this in the reconstruction loss (0: plain mean)")] = 0.0,
    diffusion_expression_weight: Annotated[float, typer.Option("--diffusion-expression-weight", help="the same weighting for the diffusion loss, on the latent grid (0: plain mean)")] = 0.0,
    decoder_adversarial_weight: Annotated[float, typer.Option("--decoder-adversarial-weight", help="decoder phase: add a patch critic's hinge loss with this weight, for sharper lids, lips and brows from the same latents (0: off; 0.1 was tried on the demo, see its model card)")] = 0.0,
    paint_prob: Annotated[float, typer.Option("--paint-prob")] = 0.2,
    cond_drop_prob: Annotated[float, typer.Option("--cond-drop-prob")] = 0.1,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint in --out")] = False,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no | fp16 | bf16")] = "no",
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads")] = None,
    max_time: Annotated[Optional[float], typer.Option("--max-time", help="stop with a checkpoint after this many seconds")] = None,
    prediction_type: Annotated[Optional[str], typer.Option("--prediction-type", help="epsilon | v_prediction (default: v_prediction from scratch, else the model's)")] = None,
    zero_snr: Annotated[Optional[bool], typer.Option("--zero-snr/--no-zero-snr", help="zero-terminal-SNR betas, trailing timesteps (default: on from scratch, else the model's)")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Train MAUGen (VAE first when none is given, then UNet + label branch + identity + text + AU cue)."""
    from .trainer import TrainConfig
    from .trainer import train as run_training

    if base is not None and init is not None:
        raise typer.BadParameter("give --base or --init, not both")
    cfg = TrainConfig(
        data=[str(d) for d in data], out=str(out), base=str(base) if base else None, init=str(init) if init else None,
        vae=str(vae) if vae else None, config=config, resolution=resolution, steps=steps, vae_steps=vae_steps, decoder_steps=decoder_steps, batch_size=batch_size, lr=lr,
        vae_lr=vae_lr, warmup=warmup, ema=ema, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        log_every=log_every, validate_every=validate_every, val_data=[str(v) for v in (val_data or [])],
        val_identities=val_identities, val_samples=val_samples, val_steps=val_steps, guidance_scale=guidance_scale,
        train_text_encoder=train_text_encoder, identity_input=identity_input, occurrence_threshold=occurrence_threshold, occ_gamma=occ_gamma,
        int_gamma=int_gamma, w_occ=w_occ, w_int=w_int, aux_weight=aux_weight, w_mrl=w_mrl, mrl_colour_jitter=mrl_colour_jitter,
        identity_attribute_weight=identity_attribute_weight, identity_image_weight=identity_image_weight,
        vae_expression_weight=vae_expression_weight, diffusion_expression_weight=diffusion_expression_weight,
        decoder_adversarial_weight=decoder_adversarial_weight, paint_prob=paint_prob,
        cond_drop_prob=cond_drop_prob, resume=resume, device=device, mixed_precision=mixed_precision,
        threads=threads, max_time_s=max_time, seed=seed, prediction_type=prediction_type, zero_snr=zero_snr,
    )
    try:
        final = run_training(cfg, echo=typer.echo)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"model: {final}")


def main() -> None:  # pragma: no cover
    train_app()

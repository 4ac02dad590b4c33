"""Everything the first GPU run should measure, as ONE JSON line on stdout (progress goes to stderr).

    benchmarks/gpu_check.sh            # on a CUDA machine: full SD-1.5-size MAUGen, 512 px, 30 steps, CFG 7.5
    benchmarks/gpu_check.sh --tiny     # anywhere: the tiny model at 64 px, 2 steps, on the CPU (a test runs it)

Measures MAUGen generation with labels (images/s) for fp16/bf16 x eager/compiled at batch 1, 16 and 'auto' (the
largest that fits, `stages.generate.largest_batch`); the stock diffusers StableDiffusionInpaintPipeline with the
very same UNet/VAE/text encoder in the same process; peak GPU memory per row; label agreement of compiled vs eager
(same seeds); and a short `mifa build` on the device with its generator busy share (the run manifest's
`generation_last_run`). Weights are random (built from configs.full_config, nothing is downloaded), so figures
are speeds, not quality. A time budget (--budget-s) skips what would not fit and says so in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from generate import _inputs, time_stock  # noqa: E402  (benchmarks/generate.py)

PROMPT = "a photo of <ID> <ID2> with moderately raised cheeks and slightly parted lips"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Check:
    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.device.type == "cuda" else None

    def run_maugen(self, model, n: int, ids, seed: int = 0):
        images, masks = _inputs(n, model.resolution)
        gens = [torch.Generator(self.device).manual_seed(seed + i) for i in range(n)]
        return model.sample([PROMPT] * n, images.to(self.device), masks.to(self.device), ids.expand(n, -1, -1), gens,
                            num_inference_steps=self.args.steps, guidance_scale=self.args.guidance)

    def time_maugen(self, model, n: int, ids) -> dict:
        self.peak_reset()
        t0 = time.perf_counter()
        self.run_maugen(model, n, ids)  # warm-up: cudnn autotune, compilation for this shape
        self.sync()
        warm = time.perf_counter() - t0
        times = []
        for r in range(self.args.repeats):
            self.sync()
            t0 = time.perf_counter()
            out = self.run_maugen(model, n, ids, seed=1000 * (r + 1))
            self.sync()
            times.append(time.perf_counter() - t0)
            assert torch.isfinite(out.intensity).all() and torch.isfinite(out.images).all()
        s = statistics.median(times)
        return {"images_per_s": round(n / s, 3), "s_per_batch": round(s, 3), "warmup_s": round(warm, 2),
                "peak_gib": self.peak_gib()}


def build_model(args, device):
    from mifa_pipeline.maugen import MAUGen, configs

    cfg = configs.tiny_config() if args.tiny else configs.full_config(resolution=args.resolution)
    return MAUGen.from_config(cfg, seed=0), cfg


def auto_batch(check: Check, model, ids) -> int:
    from mifa_pipeline.stages.generate import largest_batch

    if check.device.type != "cuda":
        return check.args.cpu_auto

    def fits(b: int) -> bool:
        try:
            images, masks = _inputs(b, model.resolution)
            model.sample([PROMPT] * b, images.to(check.device), masks.to(check.device), ids.expand(b, -1, -1),
                         [torch.Generator(check.device).manual_seed(i) for i in range(b)], num_inference_steps=1,
                         guidance_scale=check.args.guidance)
            check.sync()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
    return largest_batch(fits, check.args.auto_limit)


def agreement(a, b) -> dict:
    return {"occurrence_prob_max_abs_diff": float((a.occurrence_prob - b.occurrence_prob).abs().max()),
            "intensity_max_abs_diff": float((a.intensity - b.intensity).abs().max()),
            "intensity_rounded_equal_share": float((a.intensity_rounded == b.intensity_rounded).float().mean()),
            "image_max_abs_diff": float((a.images - b.images).abs().max())}


def maugen_rows(check: Check, base, dname: str, mode: str, out: dict, face: torch.Tensor) -> list[dict]:
    """Batch 1, 16 and 'auto' of one dtype and mode; then the agreement sample (same seeds) at batch 16."""
    args, device = check.args, check.device
    base.to(device=device, dtype=DTYPES[dname])
    ids = base.encode_identity(face.to(device))
    if mode == "compiled":
        torch._dynamo.reset()
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        base.enable_speedups(channels_last=False, compile=True, compile_backend=args.compile_backend)
    if f"auto_batch_{dname}" not in out:
        out[f"auto_batch_{dname}"] = auto_batch(check, base, ids)
        log(f"{dname}: batch 'auto' = {out[f'auto_batch_{dname}']}")
    auto = out[f"auto_batch_{dname}"]
    rows = []
    for label, n in [(1, 1), (args.batch, args.batch), ("auto", auto)]:
        if check.left() < 0:
            check.skipped.append(f"{dname} {mode} batch {label}: budget")
            continue
        try:
            row = {"dtype": dname, "mode": mode, "batch": label, "n": n, **check.time_maugen(base, n, ids)}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            row = {"dtype": dname, "mode": mode, "batch": label, "n": n, "error": "out of memory"}
        rows.append(row)
        log(json.dumps(row))
    if check.left() > 0:
        sample = check.run_maugen(base, args.batch, ids, seed=7)
        if mode == "eager":
            out.setdefault("_eager", {})[dname] = sample
        elif dname in out.get("_eager", {}):
            out[f"compiled_vs_eager_{dname}"] = agreement(sample, out["_eager"][dname])
            log(f"compiled vs eager {dname}: {out[f'compiled_vs_eager_{dname}']}")
    if mode == "compiled":  # back to eager: drop the compiled wrappers
        base.dig.unet._compiled_call_impl = None
        base.vae.decoder._compiled_call_impl = None
    return rows


def stock_rows(check: Check, base, cfg, dname: str) -> list[dict]:
    """The stock diffusers inpaint pipeline with the same UNet/VAE/text encoder, eager, batch 1 and 16."""
    from diffusers import StableDiffusionInpaintPipeline

    from mifa_pipeline.maugen.sampler import make_scheduler

    args, device = check.args, check.device
    base.to(device=device, dtype=DTYPES[dname])
    pipe = StableDiffusionInpaintPipeline(
        vae=base.vae, text_encoder=base.text.text_encoder, tokenizer=base.text.tokenizer, unet=base.dig.unet,
        scheduler=make_scheduler("ddim", base.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for n in (1, args.batch):
        if check.left() < 0:
            check.skipped.append(f"stock batch {n}: budget")
            continue
        check.peak_reset()
        s = statistics.median(time_stock(pipe, n, cfg["resolution"], args.steps, args.guidance, args.repeats, device))
        rows.append({"dtype": dname, "batch": n, "images_per_s": round(n / s, 3), "s_per_batch": round(s, 3),
                     "peak_gib": check.peak_gib()})
        log(json.dumps(rows[-1]))
    return rows


def mifa_build(check: Check, base) -> dict:
    """A short `mifa build` of the same model from a checkpoint folder, on the device, through Ray."""
    args = check.args
    if check.left() < args.build_reserve_s:
        check.skipped.append("mifa build: budget")
        return {"skipped": "budget"}
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "model", Path(tmp) / "out"
        base.to(device="cpu", dtype=torch.float32)
        if check.device.type == "cuda":
            torch.cuda.empty_cache()  # the build's worker needs the device memory
        base.save_pretrained(folder)
        sets = [f"model.checkpoint={folder}", f"model.device={'cuda' if check.device.type == 'cuda' else 'cpu'}",
                f"sampler.steps={args.steps}", f"sampler.guidance_scale={args.guidance}",
                f"identities.count={args.build_identities}", "identities.samples_per_identity=4",
                f"writer.samples_per_shard={args.build_shard}", "resources.identities_per_unit=2"]
        if check.device.type == "cuda":
            sets += [f"sampler.dtype={'float16' if args.dtypes[0] == 'fp16' else 'bfloat16'}",
                     "sampler.batch_invariant=false", f"sampler.batch_size={args.build_batch}",
                     "resources.gpus_per_worker=1"]
        else:
            sets += ["sampler.batch_size=4"]
        result = {}
        for judges in ("demo", "off"):
            extra = [] if judges == "demo" else ["filter.face.detector=none", "filter.identity.embedder=none",
                                                 "filter.au.estimator=none"]
            cmd = [sys.executable, "-m", "mifa_pipeline.cli", "build", "--out", str(out), "--fresh", "--no-progress",
                   "--runner", args.runner, *[x for s in [*sets, *extra] for x in ("--set", s)]]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr, stderr=sys.stderr, timeout=max(30, check.left()))
            result = {"judges": judges, "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2)}
            if proc.returncode == 0:
                break
            log(f"mifa build with judges {judges} exited {proc.returncode}")
        if result["rc"] == 0:
            from mifa_pipeline.manifest import read_run_manifest
            from mifa_pipeline.storage import Location

            content = read_run_manifest(Location(str(out)))
            gen = content["generation_last_run"]
            after = [w["busy_share_after_first_shard"] for w in gen["workers"]
                     if w["busy_share_after_first_shard"] is not None]
            result.update({"samples": content["counts"]["planned_samples"], "kept": content["counts"]["kept_samples"],
                           "build_wall_s": gen["wall_seconds"], "generator_busy": gen["busy_share_of_wall"],
                           "generator_busy_after_warmup": min(after) if after else None,
                           "workers": gen["workers"], "runner": content["runner"],
                           "stage_seconds": {k: v["seconds"] for k, v in content["stages"].items()}})
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, 64 px, 2 steps, on the CPU (the pre-flight)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new items after this (default 420)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    ap.add_argument("--runner", default="ray", choices=["ray", "local"])
    args = ap.parse_args()
    tiny = args.tiny
    args.resolution = 512
    args.steps = 2 if tiny else 30
    args.guidance = 7.5
    args.batch = 2 if tiny else 16
    args.repeats = 1
    args.cpu_auto = 3  # 'auto' off CUDA in this check: a stated size, so the tiny run has a third shape
    args.auto_limit = 128  # keeps the 'auto' rows inside the 8-minute budget (the pipeline's own limit: 256)
    args.compile_backend = "eager" if tiny else "inductor"  # tiny: dynamo tracing only (inductor: ~75 s on 2 cores)
    args.compile_reserve_s = 0 if tiny else 150
    args.build_reserve_s = 0 if tiny else 90
    args.build_identities, args.build_shard, args.build_batch = (4, 8, 4) if tiny else (16, 16, 16)
    args.budget_s = args.budget_s or (600 if tiny else 420)
    check = Check(args)
    log(f"gpu_check on {check.device} ({'tiny' if tiny else 'full size'}); torch {torch.__version__}")
    t0 = time.perf_counter()
    base, cfg = build_model(args, check.device)
    summary = {"check": "mifa_gpu_check", "tiny": tiny, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else "cpu",
               "resolution": cfg["resolution"], "steps": args.steps, "guidance_scale": args.guidance,
               "labels": True, "scheduler": "ddim", "weights": "random (configs)", "compile_backend": args.compile_backend,
               "model_build_s": round(time.perf_counter() - t0, 2)}
    # in order of importance, so a tight budget drops the least important: eager, stock, the build, compiled
    out: dict = {}
    face = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    rows = [r for d in args.dtypes for r in maugen_rows(check, base, d, "eager", out, face)]
    stock = stock_rows(check, base, cfg, args.dtypes[0])
    summary["mifa_build"] = mifa_build(check, base)
    for d in args.dtypes:
        if check.left() < args.compile_reserve_s:
            check.skipped.append(f"{d} compiled: budget")
            continue
        rows += maugen_rows(check, base, d, "compiled", out, face)
    out.pop("_eager", None)
    summary.update(out)
    summary["maugen"], summary["stock_inpaint"] = rows, stock
    best_stock = max((r["images_per_s"] for r in stock), default=None)
    best = max((r["images_per_s"] for r in rows if "images_per_s" in r), default=None)
    summary["maugen_best_over_stock_best"] = round(best / best_stock, 3) if best and best_stock else None
    peaks = [r["peak_gib"] for r in [*rows, *stock] if r.get("peak_gib") is not None]
    summary["peak_gib_overall"] = max(peaks) if peaks else None
    summary["skipped"] = check.skipped
    summary["total_s"] = round(time.perf_counter() - check.start, 1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

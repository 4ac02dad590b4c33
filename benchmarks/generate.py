"""Throughput of MAUGen generation (images + AU labels) against stock diffusers SD-inpainting.

On a GPU: the full SD-1.5 size at 512 px, 30 steps, CFG 7.5, fp16 by default, random weights built from
configs (nothing is downloaded). In the same run, ``StableDiffusionInpaintPipeline`` is timed with the very
same UNet / VAE / text encoder, so the difference is MAUGen's extra work (89-token context, label branch,
read-out). On a CPU it runs the tiny configuration and says so. The last printed line is one JSON object
with every figure.

    python benchmarks/generate.py                        # auto: GPU full size, else CPU tiny
    python benchmarks/generate.py --batch-sizes 8 16 --compile --channels-last
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Spinning OpenMP workers collapse CPU throughput on shared cores (measured 4-10x slower with 2 threads next
# to other jobs); passive waiting costs nothing measurable. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(n: int, res: int):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, res, res, generator=g)
    masks = torch.zeros(n, 1, res, res)
    masks[:, :, res // 8: 7 * res // 8, res // 6: 5 * res // 6] = 1  # face region to generate
    return images * (1 - masks), masks


PROMPT = "a photo of <ID> <ID2> with moderately raised cheeks and slightly parted lips"


def time_maugen(model, n: int, steps: int, cfg: float, repeats: int, device) -> list[float]:
    images, masks = _inputs(n, model.resolution)
    ids = model.encode_identity(torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)).to(device))
    times = []
    for r in range(repeats + 1):  # first run = warm-up (cudnn autotune, compile)
        gens = [torch.Generator().manual_seed(1000 * r + i) for i in range(n)]
        _sync(device)
        t0 = time.perf_counter()
        out = model.sample([PROMPT] * n, images, masks, ids, gens, num_inference_steps=steps, guidance_scale=cfg)
        _sync(device)
        if r:
            times.append(time.perf_counter() - t0)
        assert out.images.shape[0] == n and torch.isfinite(out.intensity).all()
    return times


def time_stock(pipe, n: int, res: int, steps: int, cfg: float, repeats: int, device) -> list[float]:
    images, masks = _inputs(n, res)
    times = []
    for r in range(repeats + 1):
        gens = [torch.Generator().manual_seed(1000 * r + i) for i in range(n)]
        _sync(device)
        t0 = time.perf_counter()
        out = pipe(prompt=[PROMPT.replace("<ID> <ID2> ", "")] * n, image=images, mask_image=masks, height=res, width=res,
                   num_inference_steps=steps, guidance_scale=cfg, generator=gens, output_type="pt")
        _sync(device)
        if r:
            times.append(time.perf_counter() - t0)
        assert out.images.shape[0] == n
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["auto", "full", "tiny"], default="auto", help="auto: full on GPU, tiny on CPU")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default fp16 on GPU, fp32 on CPU")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (both pipelines)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock diffusers pipeline")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="MAUGen.micro_batch_size (fixed-shape chunks for bitwise batch invariance)")
    args = ap.parse_args()

    from diffusers import StableDiffusionInpaintPipeline

    from mifa_pipeline.maugen import MAUGen
    from mifa_pipeline.maugen import configs
    from mifa_pipeline.maugen.sampler import make_scheduler

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "tiny")
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    batch_sizes = args.batch_sizes or ([1, 4, 8, 16] if device.type == "cuda" else [1, 4, 8])
    if device.type == "cpu":
        print(f"NOTE: no GPU; running the TINY configuration on CPU ({torch.get_num_threads()} threads) - "
              "these figures say nothing about full-size GPU throughput.")

    cfg = configs.full_config() if size == "full" else configs.tiny_config()
    t0 = time.perf_counter()
    model = MAUGen.from_config(cfg, seed=0).to(device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    if args.compile:
        # one graph per (batch size, 77 vs 89 tokens): keep them all instead of falling back to eager
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    if args.channels_last or args.compile:
        model.enable_speedups(channels_last=args.channels_last, compile=args.compile)
    model.micro_batch_size = args.micro_batch
    counts = model.parameter_counts()
    print(f"{size} MAUGen on {device} {dtype_name}: {cfg['resolution']} px, {args.steps} steps, CFG {args.guidance}, "
          f"{sum(counts.values()) / 1e6:.1f} M params (UNet {counts['unet'] / 1e6:.1f} M, label branch "
          f"{counts['label_branch'] / 1e6:.2f} M), built in {build_s:.1f} s")

    pipe = None
    if not args.no_stock:
        pipe = StableDiffusionInpaintPipeline(
            vae=model.vae, text_encoder=model.text.text_encoder, tokenizer=model.text.tokenizer, unet=model.dig.unet,
            scheduler=make_scheduler("ddim", model.scheduler_config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)

    results = []
    for n in batch_sizes:
        row = {"batch_size": n}
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time_maugen(model, n, args.steps, args.guidance, args.repeats, device)
            row["maugen_s_per_batch"] = statistics.median(t)
            row["maugen_images_per_s"] = n / row["maugen_s_per_batch"]
            if device.type == "cuda":
                row["maugen_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if pipe is not None:
                t = time_stock(pipe, n, cfg["resolution"], args.steps, args.guidance, args.repeats, device)
                row["stock_s_per_batch"] = statistics.median(t)
                row["stock_images_per_s"] = n / row["stock_s_per_batch"]
                row["maugen_vs_stock"] = row["maugen_images_per_s"] / row["stock_images_per_s"]
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            torch.cuda.empty_cache()
        results.append(row)
        line = f"batch {n:>3}: MAUGen {row.get('maugen_images_per_s', float('nan')):7.2f} img/s"
        if "stock_images_per_s" in row:
            line += f" | stock SD-inpaint {row['stock_images_per_s']:7.2f} img/s | ratio {row['maugen_vs_stock']:.2f}"
        print(line + (f" ({row['error']})" if "error" in row else ""), flush=True)

    summary = {
        "benchmark": "maugen_generate",
        "size": size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "resolution": cfg["resolution"],
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": "ddim",
        "compile": args.compile,
        "channels_last": args.channels_last,
        "repeats": args.repeats,
        "micro_batch_size": args.micro_batch,
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

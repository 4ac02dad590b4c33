"""What a VAE alone can carry of the AUs and the identity, before a UNet is trained on it (issue 4).

    python benchmarks/vae_ceiling.py --vae mifa_pipeline/assets/demo_model [--resolution 64] [--sweep-identities 16]

A UNet can draw no more than its VAE's round trip keeps, and training a new UNet for a new VAE costs hours,
so a candidate VAE (a diffusers ``AutoencoderKL`` folder, or a MAUGen model folder holding one in ``vae/``)
is judged alone, by the same judges and figures as ``quality.py``'s "via VAE" column and identity ceiling:
teacher single-AU sweeps (held-out identities of seed --seed, one AU at 0..5, the others 0), their Spearman
against the independent proxy on the renders themselves and on their round trips through the VAE; and the
SFace ROC AUC of held-out expressive renders (and their round trips) against the identities' neutral
references. Images are enlarged to --judge-size px before judging. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality  # noqa: E402  (the held-out draw, the round trip and the statistics)


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    return AutoencoderKL.from_pretrained(folder, local_files_only=True).eval()


@torch.no_grad()
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", type=Path, required=True, help="AutoencoderKL folder, or a MAUGen model folder")
    ap.add_argument("--resolution", type=int, default=None, help="image size (default: the VAE's sample_size)")
    ap.add_argument("--sweep-identities", type=int, default=16)
    ap.add_argument("--identities", type=int, default=24, help="identities (x4 renders) for the identity figure")
    ap.add_argument("--seed", type=int, default=4243, help="held-out teacher seed of the sweeps (identity: seed-1)")
    ap.add_argument("--judge-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    from mifa_pipeline.aus import DISFA12
    from mifa_pipeline.faces import build_face_models
    from mifa_pipeline.stages.teacher import identity_params
    from mifa_pipeline.teacher import render_face

    vae = load_vae(args.vae)
    res = int(args.resolution or vae.config.sample_size)
    holder = SimpleNamespace(vae=vae)   # quality.vae_roundtrip reads model.vae only
    judges = build_face_models()
    print(f"VAE {args.vae}: {res} px, {vae.config.latent_channels} latent channels, "
          f"factor {2 ** (len(vae.config.block_out_channels) - 1)}; judges see {max(args.judge_size, res)} px")

    def proxy(image, au):
        big = quality.enlarge(image, args.judge_size)
        faces = judges.detect(big)
        est = judges.estimate_aus(big, faces[0] if faces else None).get(au)
        return np.nan if est is None else float(est)

    def embedding(image):
        big = quality.enlarge(image, args.judge_size)
        faces = judges.detect(big)
        return judges.embed(big, faces[0]) if faces else None

    people, _ = quality.held_out(args.seed, args.sweep_identities, 1, res)
    sweep = {}
    print(f"\nsingle-AU sweeps: {len(people)} identities x levels 0..5")
    print(f"{'AU':6s} {'teacher':>8s} {'via VAE':>8s}")
    for au in DISFA12:
        renders, who, level = [], [], []
        for p in people:
            for lv in range(6):
                renders.append(render_face(identity_params(p.seed), {au: lv}, size=res).image)
                who.append(p.identity)
                level.append(lv)
        who_a, level_a = np.asarray(who, np.float64), np.asarray(level, np.float64)
        teacher = quality.sweep_spearman(who_a, level_a, np.array([proxy(i, au) for i in renders]))
        via = quality.sweep_spearman(who_a, level_a, np.array([proxy(i, au) for i in quality.vae_roundtrip(holder, renders)]))
        sweep[au] = {"teacher_rho": teacher, "via_vae_rho": via}
        print(f"{au:6s} {quality.fmt(teacher):>8s} {quality.fmt(via):>8s}")

    ids, samples = quality.held_out(args.seed - 1, args.identities, 4, res)
    person = {p.identity: p for p in ids}
    refs = {p.identity: embedding(p.reference) for p in ids}
    renders = [render_face(identity_params(person[s.identity].seed), s.requested, size=res).image for s in samples]
    identity = {"teacher": quality.roc_auc(*quality.identity_pairs([embedding(i) for i in renders], samples, refs)),
                "via_vae": quality.roc_auc(*quality.identity_pairs(
                    [embedding(i) for i in quality.vae_roundtrip(holder, renders)], samples, refs))}
    print(f"\nidentity ROC AUC ({len(samples)} expressive renders vs {len(ids)} neutral references): "
          f"teacher {quality.fmt(identity['teacher'])}, through the VAE {quality.fmt(identity['via_vae'])}")
    result = {"vae": str(args.vae), "resolution": res, "latent_channels": int(vae.config.latent_channels),
              "sweep_identities": len(people), "seed": args.seed, "sweep": sweep, "identity_auc": identity,
              "seconds": round(time.time() - t_start, 1)}
    print(json.dumps(result, separators=(",", ":")))
    judges.close()
    return result


if __name__ == "__main__":
    main()

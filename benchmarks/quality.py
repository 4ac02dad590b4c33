"""Quality of a MAUGen checkpoint on held-out teacher identities and prompts (issue 4).

    python benchmarks/quality.py --model mifa_pipeline/assets/demo_model [--n 96] [--sweep-identities 8]

The held-out set is drawn like a `mifa teacher` build with another seed (default 4242; the demo model was
trained on seed 0): the build's own prompt stage (teacher descriptions of each identity, the demo
manifest's expression mix), neutral teacher renders as references, the default ellipse mask and canvas,
and MAUGen sampled exactly as `mifa build` does (DDIM, 20 steps, guidance 7.5, the default negative prompt).

Figures (every one printed, the last line is one JSON object):
1. labels vs request: per-AU intensity MAE of MAUGen's intensities against the requested FACS 0-5, and
   per-AU occurrence F1 (requested >= 2, the DISFA protocol, vs MAUGen's occurrence_prob >= 0.5);
2. labels vs image: single-AU sweeps (same identity, one AU asked at 0..5, the others 0): per-AU Spearman
   (within each identity's sweep, averaged over identities) of MAUGen's intensity for that AU against the
   independent MediaPipe/landmark proxy of the image, beside the same Spearman for the teacher's own renders
   of the same sweeps (exact intensities; the ceiling), for those renders through the model's VAE (can its
   latent space and decoder show the AU at all?), and the Spearman of the requested level against the
   proxy on MAUGen's images (does the face follow the prompt). AUs the estimator has no proxy for are
   n/a; an AU counts towards the target only where the teacher's own Spearman exceeds 0.3 (a proxy that
   cannot read the teacher cannot judge the model). Each ratio (model / teacher) comes with a 90% bootstrap
   interval over the sweep identities: with 8 identities a ratio moves by ~0.2 between draws;
3. identity: SFace cosine of each generated face to its own reference vs to the other identities'
   references, as a ROC AUC (with a 90% bootstrap interval over the samples), beside three ceilings that
   say where identity is lost: the teacher's own renders of the same requests, those renders through the
   model's VAE, and the model's identity encoder (cosine of the <ID> words of each render and of each
   reference);
4. face detection rate (YuNet) of the generated images (teacher renders beside it).
Images are enlarged to --judge-size px (bicubic) before any face model sees them: at 64 px YuNet and
MediaPipe miss many faces (the teacher probe measured at 128/256 px).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mifa_pipeline.aus import describe_aus  # noqa: E402

NEGATIVE = ("deformed, distorted, disfigured, cartoon, 3d render, low quality, blurry, jpeg artifacts, "
            "plastic skin, blotchy skin, exaggerated wrinkles, over-exaggerated expression")


# --------------------------------------------------------------------------- statistics
def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a, b) -> float | None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def sweep_rhos(who, a, b) -> dict:
    """Identity -> the Spearman within that identity's sweep (levels 0..5 of one AU); None where undefined."""
    return {w: spearman(a[who == w], b[who == w]) for w in np.unique(who).tolist()}


def sweep_spearman(who, a, b) -> float | None:
    """Mean over identities of the Spearman within each identity's sweep (levels 0..5 of one AU).

    Within one face, because a sweep asks how one face changes: pooling faces would mix in how the proxy's
    resting value differs between faces, which says nothing about following the AU."""
    return mean_rho(sweep_rhos(who, a, b))


def mean_rho(rhos: dict) -> float | None:
    """The sweep figure of per-identity Spearmans: their mean over the identities where one is defined."""
    defined = [r for r in rhos.values() if r is not None]
    return float(np.mean(defined)) if defined else None


def ratio_interval(model: dict, teacher: dict, level: float = 0.9, draws: int = 2000,
                   seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap interval of mean(model rho) / mean(teacher rho), resampling the sweep identities.

    Why: a sweep figure rests on a handful of identities (8 by default) and moves by ~0.2 between draws; the
    interval says how much of a ratio's distance from 0.7 that noise can explain. Identities are resampled
    as pairs (the model's and the teacher's sweep of the same face); draws whose teacher mean is <= 0 have
    no ratio and are left out."""
    ids = [w for w in model if model[w] is not None and teacher.get(w) is not None]
    if len(ids) < 2:
        return None
    m = np.array([model[w] for w in ids], np.float64)
    t = np.array([teacher[w] for w in ids], np.float64)
    pick = np.random.default_rng(seed).integers(0, len(ids), (draws, len(ids)))
    num, den = m[pick].mean(1), t[pick].mean(1)
    ratios = num[den > 0] / den[den > 0]
    if len(ratios) < draws // 2:
        return None
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def auc_interval(embeddings, samples, ref_emb, level: float = 0.9, draws: int = 1000,
                 seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap interval of the identity ROC AUC, resampling the generated samples (each brings its cosine
    to its own reference and to every other one)."""
    rows = [identity_pairs([e], [s], ref_emb) for e, s in zip(embeddings, samples) if e is not None]
    if len(rows) < 2:
        return None
    pick = np.random.default_rng(seed).integers(0, len(rows), (draws, len(rows)))
    aucs = [roc_auc([c for i in p for c in rows[i][0]], [c for i in p for c in rows[i][1]]) for p in pick]
    aucs = [a for a in aucs if a is not None]
    if not aucs:
        return None
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def roc_auc(pos, neg) -> float | None:
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return None
    ranks = _ranks(np.concatenate([pos, neg])) + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def f1(true: np.ndarray, pred: np.ndarray) -> float | None:
    tp = float((true & pred).sum())
    denom = float(true.sum() + pred.sum())
    return None if denom == 0 else 2 * tp / denom


def fmt(v, digits=3) -> str:
    return "  n/a" if v is None else f"{v:.{digits}f}"


def fmt_interval(v, digits=2) -> str:
    return "n/a" if v is None else f"[{v[0]:.{digits}f}, {v[1]:.{digits}f}]"


# --------------------------------------------------------------------------- held-out set
def held_out(seed: int, identities: int, per_identity: int, resolution: int):
    """People (with neutral teacher references, masks, canvases) and samples, as a teacher build draws them."""
    from mifa_pipeline.config import EllipseMask, PromptSection
    from mifa_pipeline.stages.identities import ellipse_mask, make_canvas
    from mifa_pipeline.stages.prompts import PromptExpansion
    from mifa_pipeline.stages.teacher import describe, identity_params
    from mifa_pipeline.teacher import render_face

    stage = PromptExpansion(PromptSection(), seed, per_identity, describe=describe)
    people, samples, _ = stage.run(range(identities))
    mask = ellipse_mask(resolution, EllipseMask())
    for p in people:
        p.reference = render_face(identity_params(p.seed), {}, size=resolution).image
        p.mask = mask
        p.canvas = make_canvas(p.reference, mask)
    return people, samples


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)


def _masks(masks: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(masks)).float().div(255.0)[:, None]


def generate(model, prompts, people_of, seeds, steps, guidance, batch):
    """MAUGen as the generation stage calls it: per-sample generators, identity from the reference."""
    images, intensity, prob = [], [], []
    for s in range(0, len(prompts), batch):
        ps, ppl, sd = prompts[s:s + batch], people_of[s:s + batch], seeds[s:s + batch]
        masks = _masks([p.mask for p in ppl])
        ids = model.encode_identity(_tensor([p.reference for p in ppl]), masks)
        out = model.sample(ps, _tensor([p.canvas for p in ppl]), masks, ids,
                           [torch.Generator().manual_seed(int(x)) for x in sd], num_inference_steps=steps,
                           guidance_scale=guidance, negative_prompt=NEGATIVE)
        images += [a.copy() for a in out.images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()]
        intensity.append(out.intensity.numpy())
        prob.append(out.occurrence_prob.numpy())
    return images, np.concatenate(intensity), np.concatenate(prob)


def identity_pairs(embeddings, samples, ref_emb) -> tuple[list[float], list[float]]:
    """SFace cosines of each embedding to its own identity's reference (pos) and to the others' (neg)."""
    from mifa_pipeline.faces import cosine

    pos, neg = [], []
    for s, e in zip(samples, embeddings):
        if e is None:
            continue
        for ident, r in ref_emb.items():
            if r is not None:
                (pos if ident == s.identity else neg).append(float(cosine(e, r)))
    return pos, neg


@torch.no_grad()
def vae_roundtrip(model, images: list[np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """Encode (posterior mode) and decode with the model's VAE: the detail its latent space keeps."""
    out = []
    for s in range(0, len(images), batch):
        x = _tensor(images[s:s + batch]).to(model.vae.device, model.vae.dtype) * 2 - 1
        y = model.vae.decode(model.vae.encode(x).latent_dist.mode()).sample.float()
        out += [a.copy() for a in y.add(1).div(2).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()]
    return out


@torch.no_grad()
def encoder_auc(model, images, samples, people) -> float | None:
    """ROC AUC of the cosine between the <ID> words of each image and of each identity's reference."""
    def words(faces, masks):
        w = model.encode_identity(_tensor(faces), _masks(masks)).float()
        return torch.nn.functional.normalize(w.reshape(len(w), -1), dim=-1)

    mask_of = {p.identity: p.mask for p in people}
    sim = (words(images, [mask_of[s.identity] for s in samples]) @ words([p.reference for p in people], [p.mask for p in people]).T).cpu().numpy()
    own = np.array([[p.identity == s.identity for p in people] for s in samples])
    return roc_auc(sim[own], sim[~own])


def ridge_r2(x: np.ndarray, y: np.ndarray, train: int, lam: float = 10.0) -> np.ndarray:
    """Held-out R^2 per column of y of a ridge regression on standardised x, fit on the first ``train`` rows."""
    mu, sd = x[:train].mean(0), x[:train].std(0) + 1e-6
    a, b = (x[:train] - mu) / sd, (x[train:] - mu) / sd
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y[:train] - y[:train].mean(0)))
    pred, true = b @ w + y[:train].mean(0), y[train:]
    return 1 - ((pred - true) ** 2).sum(0) / ((true - true.mean(0)) ** 2).sum(0)


@torch.no_grad()
def words_know_geometry(model, seed: int, n: int = 600) -> dict[str, float]:
    """What the <ID> words say about the face inside the mask: held-out R^2 of a linear probe from the words
    of n neutral teacher faces to the teacher's shape parameters (eye size/spacing, brows, nose, mouth...).

    Separating identities is not enough: words that tell people apart by hair or background colour give the
    UNet nothing to draw the eyes, nose and mouth from (R^2 ~ 0 here while the identity AUC stays low)."""
    from mifa_pipeline.config import EllipseMask
    from mifa_pipeline.stages.identities import ellipse_mask
    from mifa_pipeline.stages.teacher import SHAPE_ATTRIBUTES, identity_params
    from mifa_pipeline.teacher import render_face

    res = model.resolution
    params = [identity_params(seed * 100003 + k) for k in range(n)]
    shape = list(SHAPE_ATTRIBUTES)
    faces = _tensor([render_face(p, {}, size=res).image for p in params])
    masks = _masks([ellipse_mask(res, EllipseMask())] * n)
    words = np.concatenate([model.encode_identity(faces[i:i + 100], masks[i:i + 100]).float().flatten(1).numpy()
                            for i in range(0, n, 100)])
    y = np.array([[getattr(p, k) for k in shape] for p in params], np.float64)
    r2 = ridge_r2(words.astype(np.float64), y, train=3 * n // 4)
    return {**{k: float(v) for k, v in zip(shape, r2)}, "mean": float(r2.mean())}


def enlarge(image: np.ndarray, size: int) -> np.ndarray:
    if size <= 0 or image.shape[0] >= size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mifa_pipeline/assets/demo_model", help="MAUGen checkpoint folder")
    ap.add_argument("--n", type=int, default=96, help="held-out samples for the label and identity figures")
    ap.add_argument("--per-identity", type=int, default=4)
    ap.add_argument("--sweep-identities", type=int, default=8, help="identities per single-AU sweep")
    ap.add_argument("--seed", type=int, default=4242, help="held-out teacher seed (training used 0)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--judge-size", type=int, default=256, help="enlarge images to this size before judging")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", default=None, help="PNG grid: references, generated samples, AU12 and AU26 sweeps")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    from mifa_pipeline.faces import build_face_models
    from mifa_pipeline.maugen import MAUGen
    from mifa_pipeline.teacher import render_face
    from mifa_pipeline.stages.teacher import identity_params

    model = MAUGen.from_pretrained(args.model)
    res = model.resolution
    au_names = model.au_names
    judges = build_face_models()
    print(f"model {args.model}: {res} px, AUs {au_names}; judges see images at {max(args.judge_size, res)} px")

    # ------------------------------------------------------------------ 1. labels vs request, identity, detection
    n_ids = max(2, -(-args.n // args.per_identity))
    people, samples = held_out(args.seed, n_ids, args.per_identity, res)
    samples = samples[:args.n]
    person = {p.identity: p for p in people}
    t0 = time.time()
    images, inten, prob = generate(model, [s.prompt for s in samples], [person[s.identity] for s in samples],
                                   [s.seed for s in samples], args.steps, args.guidance, args.batch)
    gen_s = time.time() - t0
    requested = np.array([[s.requested[a] for a in au_names] for s in samples], np.float64)
    mae = np.abs(inten - requested)
    occ_true, occ_pred = requested >= 2, prob >= 0.5
    per_au = {}
    print(f"\n1. labels vs request on {len(samples)} held-out samples ({n_ids} identities; "
          f"{gen_s / len(samples):.2f} s/sample)")
    print(f"{'AU':6s} {'MAE':>6s} {'F1>=2':>6s} {'asked':>6s} {'pred':>6s}")
    for j, au in enumerate(au_names):
        per_au[au] = {"mae": float(mae[:, j].mean()), "f1": f1(occ_true[:, j], occ_pred[:, j]),
                      "asked": int(occ_true[:, j].sum()), "predicted": int(occ_pred[:, j].sum())}
        print(f"{au:6s} {per_au[au]['mae']:6.3f} {fmt(per_au[au]['f1']):>6s} {per_au[au]['asked']:6d} {per_au[au]['predicted']:6d}")
    f1s = [v["f1"] for v in per_au.values() if v["f1"] is not None]
    micro_f1 = f1(occ_true.ravel(), occ_pred.ravel())
    print(f"mean   {mae.mean():6.3f} {np.mean(f1s):6.3f} (macro F1 over {len(f1s)} AUs; micro F1 {fmt(micro_f1)})")

    # identity + detection
    def embedding(image):
        big = enlarge(image, args.judge_size)
        faces = judges.detect(big)
        return judges.embed(big, faces[0]) if faces else None

    ref_emb = {p.identity: embedding(p.reference) for p in people}
    gen_emb = [embedding(img) for img in images]
    detected = sum(e is not None for e in gen_emb)
    det_rate = detected / len(samples)
    pos, neg = identity_pairs(gen_emb, samples, ref_emb)
    auc = roc_auc(pos, neg)
    auc_ci = auc_interval(gen_emb, samples, ref_emb)
    print(f"\n3. identity: SFace cosine to own reference {np.mean(pos) if pos else float('nan'):.3f} vs others "
          f"{np.mean(neg) if neg else float('nan'):.3f}; ROC AUC {fmt(auc)} ({len(pos)} own, {len(neg)} other pairs; "
          f"90% bootstrap interval over the samples {fmt_interval(auc_ci)})")
    # Where identity is lost: the teacher's own renders of the same requests (the ceiling), the same renders
    # through the model's VAE (what its latent space can carry at all), and the model's identity encoder
    # (do the <ID> words it conditions on tell the identities apart?).
    teacher_imgs = [render_face(identity_params(person[s.identity].seed), s.requested, size=res).image for s in samples]
    teacher_emb = [embedding(img) for img in teacher_imgs]
    teacher_detected = sum(e is not None for e in teacher_emb)
    ceilings = {"teacher": roc_auc(*identity_pairs(teacher_emb, samples, ref_emb)),
                "vae_roundtrip": roc_auc(*identity_pairs([embedding(i) for i in vae_roundtrip(model, teacher_imgs)],
                                                          samples, ref_emb)),
                "identity_encoder": encoder_auc(model, teacher_imgs, samples, people)}
    print(f"   ceilings (ROC AUC): teacher renders {fmt(ceilings['teacher'])}, teacher renders through the "
          f"model's VAE {fmt(ceilings['vae_roundtrip'])}, <ID> words of the model's identity encoder "
          f"{fmt(ceilings['identity_encoder'])}")
    geometry = words_know_geometry(model, args.seed + 7)
    print(f"   what the <ID> words know of the face's shape (held-out R^2 of a linear probe to the teacher's "
          f"{len(geometry) - 1} shape parameters): mean {geometry['mean']:.2f}; "
          + ", ".join(f"{k} {v:.2f}" for k, v in geometry.items() if k != "mean"))
    print(f"4. face detection rate: {det_rate:.3f} ({detected}/{len(samples)}); teacher renders of the same "
          f"requests: {teacher_detected / len(samples):.3f}")

    # ------------------------------------------------------------------ 2. single-AU sweeps
    sweep_people, _ = held_out(args.seed + 1, args.sweep_identities, 1, res)
    from mifa_pipeline.stages.prompts import ID_PLACEHOLDER, describe_person

    prompts, owners, seeds, jobs = [], [], [], []
    for p in sweep_people:
        who = describe_person(p.demographics)
        for j, au in enumerate(au_names):
            for level in range(6):
                words = ("with a neutral, relaxed expression" if level == 0
                         else "the face shows " + describe_aus({au: level}))
                prompts.append(f"a close-up portrait photo of {ID_PLACEHOLDER}, {who}, {words}")
                owners.append(p)
                seeds.append(1000 * p.identity + 10 * j + level)
                jobs.append((p, au, j, level))
    t0 = time.time()
    s_images, s_inten, _ = generate(model, prompts, owners, seeds, args.steps, args.guidance, args.batch)
    sweep_s = time.time() - t0
    rows = {au: {"who": [], "label": [], "proxy": [], "level": [], "t_proxy": [], "v_proxy": []} for au in au_names}
    teacher_small = []

    def proxy_of(image, au):
        """The judge's estimate of ``au`` on the image (NaN where it has none, e.g. no landmark fit)."""
        big = enlarge(image, args.judge_size)
        faces = judges.detect(big)
        est = judges.estimate_aus(big, faces[0] if faces else None).get(au)
        return np.nan if est is None else float(est)

    covered = set(judges.au_estimator.describe().get("covered", au_names))
    missing = 0
    for (p, au, j, level), img, lab in zip(jobs, s_images, s_inten):
        proxy = proxy_of(img, au)
        missing += bool(np.isnan(proxy)) and au in covered
        r = rows[au]
        r["who"].append(p.identity)
        r["label"].append(float(lab[j]))
        r["proxy"].append(proxy)
        r["level"].append(level)
        t_small = render_face(identity_params(p.seed), {au: level}, size=res).image
        r["t_proxy"].append(proxy_of(t_small, au))
        teacher_small.append(t_small)
    # the same teacher sweeps through the model's VAE: can its latent space carry the AU at all?
    for (p, au, j, level), img in zip(jobs, vae_roundtrip(model, teacher_small)):
        rows[au]["v_proxy"].append(proxy_of(img, au))
    sweep = {}
    print(f"\n2. single-AU sweeps: {args.sweep_identities} identities x {len(au_names)} AUs x levels 0..5 "
          f"({len(jobs)} images, {sweep_s / len(jobs):.2f} s/image; {missing} without a landmark fit)")
    print(f"{'AU':6s} {'rho(label,proxy)':>16s} {'rho(asked,proxy)':>16s} {'teacher':>8s} {'ratio':>6s} "
          f"{'90% interval':>13s} {'rho(label,asked)':>16s} {'via VAE':>8s}")
    for au in au_names:
        r = {k: np.asarray(v, np.float64) for k, v in rows[au].items()}
        model_rhos = sweep_rhos(r["who"], r["label"], r["proxy"])
        teacher_rhos = sweep_rhos(r["who"], r["level"], r["t_proxy"])
        rho, ceil = mean_rho(model_rhos), mean_rho(teacher_rhos)
        rho_req = sweep_spearman(r["who"], r["level"], r["proxy"])
        follow = sweep_spearman(r["who"], r["label"], r["level"])
        via_vae = sweep_spearman(r["who"], r["level"], r["v_proxy"])
        ratio = None if rho is None or ceil is None or ceil <= 0 else rho / ceil
        interval = ratio_interval(model_rhos, teacher_rhos)
        sweep[au] = {"rho_label_proxy": rho, "rho_asked_proxy": rho_req, "teacher_rho": ceil, "ratio": ratio,
                     "ratio_interval90": interval, "rho_label_asked": follow, "teacher_via_vae_rho": via_vae}
        note = "  (not counted: the proxy cannot read the teacher)" if ceil is None or ceil <= 0.3 else ""
        print(f"{au:6s} {fmt(rho):>16s} {fmt(rho_req):>16s} {fmt(ceil):>8s} {fmt(ratio, 2):>6s} "
              f"{fmt_interval(interval):>13s} {fmt(follow):>16s} {fmt(via_vae):>8s}{note}")

    if args.grid:
        cols = min(12, len(samples))
        top = np.concatenate([person[s.identity].reference for s in samples[:cols]], axis=1)
        mid = np.concatenate(images[:cols], axis=1)
        # the first sweep identity asked for AU12 then AU26 at levels 0..5
        picks = [k for k, (p, au, j, level) in enumerate(jobs) if p is jobs[0][0] and au in ("AU12", "AU26")]
        sweep_imgs = [s_images[k] for k in picks][:cols] + [np.zeros_like(images[0])] * max(0, cols - len(picks))
        Image.fromarray(np.concatenate([top, mid, np.concatenate(sweep_imgs, axis=1)], axis=0)).save(args.grid)
        print(f"grid: {args.grid}")

    targets = {
        "detection>=0.95": det_rate >= 0.95,
        "occurrence_f1>=0.8": bool(np.mean(f1s) >= 0.8) if f1s else False,
        "intensity_mae<=0.6": bool(mae.mean() <= 0.6),
        "identity_auc>=0.9": bool(auc is not None and auc >= 0.9),
        "sweep_ratio>=0.7_every_measurable_AU": all(v["ratio"] is not None and v["ratio"] >= 0.7
                                                    for au, v in sweep.items()
                                                    if v["teacher_rho"] is not None and v["teacher_rho"] > 0.3),
    }
    result = {
        "model": str(args.model), "resolution": res, "judge_size": max(args.judge_size, res), "n": len(samples),
        "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
        "intensity_mae": float(mae.mean()), "occurrence_f1_macro": float(np.mean(f1s)) if f1s else None,
        "occurrence_f1_micro": micro_f1, "per_au": per_au, "identity_auc": auc, "identity_auc_interval90": auc_ci,
        "identity_ceilings": ceilings, "identity_words_shape_r2": geometry, "identity_cos_own": float(np.mean(pos)) if pos else None, "identity_cos_other": float(np.mean(neg)) if neg else None,
        "detection_rate": det_rate, "teacher_detection_rate": teacher_detected / len(samples),
        "sweep": sweep, "targets": targets, "seconds": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, separators=(",", ":")))
    judges.close()
    return result


if __name__ == "__main__":
    main()

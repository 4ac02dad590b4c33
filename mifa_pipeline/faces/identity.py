"""Identity embeddings through insightface's own ArcFace loader, so a user's model pack drops in.

`insightface.model_zoo.get_model(path)` routes any square-input, single-output ONNX to `ArcFaceONNX`.
The offline default, SFace, needs two fixes to run that way (measured, see environment notes):
its graph lists 29 stale inputs that no node consumes (onnxruntime then demands them as feeds), and
its normalisation lives inside the graph, so the loader's default mean/std of 127.5 must become 0/1.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .detect import Face, align


def stale_inputs(model) -> list[str]:
    """Graph inputs that no node consumes and that are not graph outputs."""
    consumed = {name for node in model.graph.node for name in node.input}
    consumed |= {out.name for out in model.graph.output}
    return [inp.name for inp in model.graph.input if inp.name not in consumed]


def strip_unused_inputs(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Write a copy of `src` without stale graph inputs to `dst` (atomically); return how many went.

    Also tidies what onnxruntime warns about on every load: weights listed as graph inputs (which
    blocks constant folding) and initializers nothing uses. The computation is unchanged.
    """
    import onnx

    model = onnx.load(str(src))
    stale = set(stale_inputs(model))
    weights = {init.name for init in model.graph.initializer}
    drop = stale | (weights if model.ir_version >= 4 else set())
    kept = [inp for inp in model.graph.input if inp.name not in drop]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    consumed = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    used = [init for init in model.graph.initializer if init.name in consumed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(used)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, dst)
    return len(stale)


def patched_path_for(path: str | os.PathLike) -> Path:
    """Where the insightface-loadable copy of `path` lives: `<stem>.insightface.onnx` beside it."""
    path = Path(path)
    return path.with_name(path.stem + ".insightface.onnx")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class ArcFaceEmbedder:
    """An ArcFace-type ONNX (SFace, buffalo_l w600k_r50, antelopev2 glintr100, ...) via insightface.

    Images are RGB uint8 (what PIL gives); insightface's `get_feat` expects BGR and swaps to RGB itself.
    `input_mean`/`input_std` default to what insightface infers from the graph; pass 0/1 for SFace.
    A model with stale inputs is loaded from a patched sibling copy (written once if missing).
    """

    name = "arcface_onnx"

    def __init__(self, model_path: str | os.PathLike, *, input_mean: float | None = None,
                 input_std: float | None = None, auto_patch: bool = True):
        import onnx
        from insightface.model_zoo import get_model

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"identity model not found: {path} (run scripts/install-face-models.sh)")
        if stale_inputs(onnx.load(str(path), load_external_data=False)):
            if not auto_patch:
                raise ValueError(f"{path} has graph inputs no node consumes; use strip_unused_inputs()")
            patched = patched_path_for(path)
            if not patched.is_file():
                strip_unused_inputs(path, patched)
            path = patched
        model = get_model(str(path), providers=["CPUExecutionProvider"])
        if model is None or type(model).__name__ != "ArcFaceONNX":
            raise ValueError(f"insightface does not route {path} to ArcFaceONNX (got {type(model).__name__})")
        if input_mean is not None:
            model.input_mean = float(input_mean)
        if input_std is not None:
            model.input_std = float(input_std)
        self.model = model
        self.model_path = path
        self.input_size = int(model.input_size[0])
        batch = model.input_shape[0]
        self._batch_fixed = isinstance(batch, int)  # SFace's graph fixes batch = 1
        self.dim = int(self.embed_aligned(np.zeros((self.input_size, self.input_size, 3), np.uint8)).size)

    def embed_aligned(self, aligned_rgb: np.ndarray) -> np.ndarray:
        """L2-normalised embedding of one face already aligned to the ArcFace template."""
        feat = self.model.get_feat(np.ascontiguousarray(aligned_rgb[:, :, ::-1])).ravel().astype(np.float32)
        return feat / (np.linalg.norm(feat) + 1e-12)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """L2-normalised embedding of `face` in the RGB `image` (aligned with insightface's norm_crop)."""
        return self.embed_aligned(align(image, face, self.input_size))

    def embed_many(self, image: np.ndarray, faces: list[Face]) -> np.ndarray:
        if not faces:
            return np.zeros((0, self.dim), np.float32)
        crops = [np.ascontiguousarray(align(image, f, self.input_size)[:, :, ::-1]) for f in faces]
        if self._batch_fixed:
            feats = np.concatenate([self.model.get_feat(c) for c in crops], axis=0)
        else:
            feats = self.model.get_feat(crops)
        feats = feats.reshape(len(faces), -1).astype(np.float32)
        return feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.model_path), "dim": self.dim,
                "input_size": self.input_size, "input_mean": self.model.input_mean,
                "input_std": self.model.input_std}


def sface_embedder(model_path: str | os.PathLike) -> ArcFaceEmbedder:
    """SFace through insightface with both fixes: stale inputs stripped, mean 0 / std 1."""
    return ArcFaceEmbedder(model_path, input_mean=0.0, input_std=1.0)

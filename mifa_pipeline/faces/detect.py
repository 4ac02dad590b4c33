"""Face detection with five keypoints, and alignment to the 112x112 ArcFace template.

Every detector takes an RGB uint8 image (what PIL and the pipeline hold) and returns `Face`s with
keypoints in insightface's order, so one alignment (insightface's `norm_crop`) serves all of them.
YuNet (int8, runs in OpenCV) is the offline default; SCRFD serves users with an insightface model pack.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Face:
    """One detected face. `bbox` is (x1, y1, x2, y2); `kps` is (5, 2) in ArcFace order: the eye on
    the image's left (the subject's right eye), the other eye, nose tip, image-left then image-right
    mouth corner."""

    bbox: np.ndarray
    kps: np.ndarray
    score: float

    @property
    def xywh(self) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return x1, y1, x2 - x1, y2 - y1

    @property
    def area(self) -> float:
        _, _, w, h = self.xywh
        return max(w, 0.0) * max(h, 0.0)


class FaceDetector(ABC):
    """`detect(rgb) -> list[Face]`, best score first."""

    name: str = "detector"
    model_path: Path | None = None

    @abstractmethod
    def detect(self, image: np.ndarray) -> list[Face]: ...

    def boxes(self, image: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        """(x, y, w, h, score) per face: the callable shape the filter stage takes."""
        return [(*face.xywh, float(face.score)) for face in self.detect(image)]


def _check_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
    return image


def _model_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"face detector model not found: {path} (run scripts/install-face-models.sh)")
    return path


class YuNetDetector(FaceDetector):
    """YuNet through `cv2.FaceDetectorYN` (its int8 graph does not run in onnxruntime).

    YuNet's landmark order (right eye, left eye, nose, right and left mouth corner, subject's
    sides = image left first) is already insightface's order.
    """

    name = "yunet"

    def __init__(self, model_path: str | os.PathLike, score_threshold: float = 0.6,
                 nms_threshold: float = 0.3, top_k: int = 5000):
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # OpenCV 5 warns per detector created
        self.model_path = _model_file(model_path)
        self.score_threshold = score_threshold
        self._net = cv2.FaceDetectorYN.create(str(self.model_path), "", (320, 320),
                                              score_threshold, nms_threshold, top_k)

    def detect(self, image: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(_check_rgb(image)[:, :, ::-1])
        h, w = bgr.shape[:2]
        self._net.setInputSize((w, h))
        _, rows = self._net.detect(bgr)
        if rows is None:
            return []
        faces = [Face(bbox=np.array([r[0], r[1], r[0] + r[2], r[1] + r[3]], np.float32),
                      kps=np.asarray(r[4:14], np.float32).reshape(5, 2), score=float(r[14])) for r in rows]
        return sorted(faces, key=lambda f: -f.score)


class ScrfdDetector(FaceDetector):
    """insightface SCRFD (e.g. `det_10g.onnx` of buffalo_l / antelopev2) via `model_zoo.get_model`.

    Untested here: no SCRFD weights are obtainable offline. It only adapts SCRFD.detect's
    (boxes+score, keypoints) arrays to `Face`s.
    """

    name = "scrfd"

    def __init__(self, model_path: str | os.PathLike, score_threshold: float = 0.5,
                 input_size: tuple[int, int] = (640, 640)):
        from insightface.model_zoo import get_model

        self.model_path = _model_file(model_path)
        model = get_model(str(self.model_path), providers=["CPUExecutionProvider"])
        if model is None or type(model).__name__ != "SCRFD":
            raise ValueError(f"insightface does not route {self.model_path} to SCRFD (got {type(model).__name__})")
        model.prepare(-1, det_thresh=score_threshold, input_size=tuple(input_size))
        self._model = model
        self.input_size = tuple(input_size)

    def detect(self, image: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(_check_rgb(image)[:, :, ::-1])
        det, kpss = self._model.detect(bgr, input_size=self.input_size)
        if kpss is None:
            raise ValueError(f"{self.model_path} gives no keypoints; alignment needs them")
        faces = [Face(bbox=det[i, :4].astype(np.float32), kps=kpss[i].astype(np.float32), score=float(det[i, 4]))
                 for i in range(det.shape[0])]
        return sorted(faces, key=lambda f: -f.score)


def align(image: np.ndarray, face: Face, size: int = 112) -> np.ndarray:
    """The face warped onto the ArcFace 5-point template (insightface's norm_crop), same channel order."""
    import warnings

    from insightface.utils import face_align

    with warnings.catch_warnings():  # scikit-image >= 0.26 deprecates the call norm_crop makes
        warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
        return face_align.norm_crop(image, landmark=np.asarray(face.kps, np.float32), image_size=size)


DETECTORS: dict[str, type[FaceDetector]] = {"yunet": YuNetDetector, "scrfd": ScrfdDetector}

"""Independent face models that judge generated samples (detection, identity, AU estimation).

Nothing here imports `mifa_pipeline.maugen`: the judges must not share code with the generator.
All images are RGB uint8 HxWx3. Model files come from `python -m mifa_pipeline.faces.fetch`
(or `scripts/install-face-models.sh`); nothing downloads at run time.

    models = build_face_models({"model_dir": "~/.cache/mifa/face-models"})
    faces = models.detect(image)                       # [Face(bbox, kps, score)], best first
    same = cosine(models.embed(img, faces[0]), models.embed(ref, ref_face))
    aus = models.estimate_aus(image, faces[0])         # {"AU12": 0.9, ..., "AU6": None?}
    manifest["face_models"] = models.records()         # path, sha256, license per file
"""

from .au_estimate import (AU_ESTIMATORS, BLENDSHAPE_AU_TABLE, DISFA12, AUEstimator, MediaPipeBlendshapeAU,
                          au_estimator_class, build_au_estimator, register_au_estimator)
from .detect import DETECTORS, Face, FaceDetector, ScrfdDetector, YuNetDetector, align
from .identity import ArcFaceEmbedder, cosine, sface_embedder, strip_unused_inputs
from .models import FaceModels, FaceModelsConfig, build_face_models, models_available
from .registry import MODEL_FILES, ChecksumError, ModelFile, default_model_dir, model_record, sha256_file, verify_file

__all__ = [
    "AU_ESTIMATORS", "BLENDSHAPE_AU_TABLE", "DISFA12", "DETECTORS", "MODEL_FILES",
    "AUEstimator", "ArcFaceEmbedder", "ChecksumError", "Face", "FaceDetector", "FaceModels", "FaceModelsConfig",
    "MediaPipeBlendshapeAU", "ModelFile", "ScrfdDetector", "YuNetDetector",
    "align", "au_estimator_class", "build_au_estimator", "build_face_models", "cosine", "default_model_dir", "model_record",
    "models_available", "register_au_estimator", "sface_embedder", "sha256_file", "strip_unused_inputs",
    "verify_file",
]

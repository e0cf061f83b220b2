"""Detect-stage throughput against ultralytics' own batched predict, same images, same weights,
same run.

Run: `make bench-detect` (or `python bench/detect_throughput.py --images 64`).
Target: the stage reaches >= 0.9 x ultralytics' images per second (it adds at most 10%).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from fundus_engine.config import DetectConfig, IngestConfig
from fundus_engine.detect import detect, load_model, resolve_device, weights_path
from fundus_engine.ingest import SourceFile, ingest, sha256_file
from fundus_engine.synth import generate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=512)
    ap.add_argument("--weights", default=None, help="default: the shipped demo detector (.pt or .onnx)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N for each side")
    args = ap.parse_args()
    config = DetectConfig(weights=args.weights, batch=args.batch, imgsz=args.imgsz, ground_truth="ignore")

    with tempfile.TemporaryDirectory(prefix="fundus-bench-") as tmp:
        root = Path(tmp)
        truths = generate(root, args.images, seed=31337)
        sources = [SourceFile(t.image, sha256_file(root / t.image)) for t in truths]
        records, _ = ingest(root, sources, {}, IngestConfig())
        model = load_model(weights_path(config))
        paths = [r.path for r in records]
        options = dict(imgsz=args.imgsz, conf=config.confidence, iou=config.iou, device=resolve_device(config.device),
                       batch=args.batch, verbose=False, stream=True)
        list(model.predict(paths[: args.batch], **options))  # warm-up: predictor set up, weights fused

        def ultralytics_predict() -> int:
            return sum(1 for _ in model.predict(paths, **options))

        def stage() -> int:
            detections, rejects = detect(records, config)
            assert not rejects
            return len({d.sha256 for d in detections})

        timings = {}
        for name, fn in (("ultralytics predict", ultralytics_predict), ("detect stage", stage)):
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - started)
            timings[name] = args.images / best

    base, mine = timings["ultralytics predict"], timings["detect stage"]
    print(f"{'ultralytics predict (baseline)':<32} {base:7.1f} images/s")
    print(f"{'detect stage':<32} {mine:7.1f} images/s   {mine / base:.2f} x baseline (target >= 0.90)")
    ok = mine / base >= 0.9
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

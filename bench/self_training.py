"""Does self-training help? A small labelled set, an unlabelled pool and a held-out set, all
synthetic, all measured in this run.

Run: `make bench-self-training` (about 35 minutes on 2 CPU cores with the defaults).

Three detectors are compared on the same held-out images:
- round 0: trained on the labelled subset only;
- control: round 0 trained on for the same extra epochs on the labelled subset only;
- round 1: round 0 trained on for the same extra epochs on labelled + pseudo-labelled pool.
The control separates the effect of pseudo-labels from the effect of simply training longer.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from fundus_engine.importers import from_yolo
from fundus_engine.synth import generate
from fundus_engine.train import self_train, train_detector, validate
from fundus_engine.training_data import write_yolo_dataset


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labelled", type=int, default=64)
    ap.add_argument("--pool", type=int, default=128)
    ap.add_argument("--held-out", type=int, default=32)
    ap.add_argument("--teacher-epochs", type=int, default=60, help="round 0, on the labelled subset")
    ap.add_argument("--epochs", type=int, default=30, help="each later round, and the control")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--confidence", type=float, default=0.25)
    ap.add_argument("--imgsz", type=int, default=384)
    ap.add_argument("--base-model", default="yolo11n.yaml",
                    help="round 0 starts from this: a .yaml (from scratch) or local .pt weights (a pretrained teacher)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fundus-selftrain-") as tmp:
        tmp = Path(tmp)
        generate(tmp / "labelled", args.labelled, seed=5000, size=args.imgsz)
        generate(tmp / "pool", args.pool, seed=6000, size=args.imgsz)
        shutil.rmtree(tmp / "pool" / "labels")  # the pool's truth is never seen
        generate(tmp / "held_out", args.held_out, seed=7000, size=args.imgsz)
        labelled = from_yolo(tmp / "labelled")
        pool = sorted((tmp / "pool" / "images").glob("*.jpg"))
        held_out = tmp / "held_out" / "dataset.yaml"

        history = self_train(labelled, pool, held_out, tmp / "rounds", args.rounds, args.confidence, args.epochs,
                             args.imgsz, base_model=args.base_model, first_epochs=args.teacher_epochs)
        control_data = write_yolo_dataset(labelled, tmp / "control" / "data", val_fraction=0)
        control = train_detector(control_data, tmp / "control" / "weights.pt", args.epochs * args.rounds, args.imgsz,
                                 model=str(history[0].weights))
        control_metrics = validate(control, held_out, args.imgsz)

    classes = sorted({c for r in history for c in r.metrics["per_class_mAP50"]} | set(control_metrics["per_class_mAP50"]))
    header = f"{'detector':<34}{'pseudo imgs':>12}{'boxes':>7}{'mAP50':>8}  " + "  ".join(f"{c[:10]:>10}" for c in classes)
    print(header)

    def row(name, pseudo, boxes, metrics):
        per = metrics["per_class_mAP50"]
        print(f"{name:<34}{pseudo:>12}{boxes:>7}{metrics['mAP50']:>8.3f}  "
              + "  ".join(f"{per.get(c, float('nan')):>10.3f}" for c in classes))

    print(f"round 0 starts from {args.base_model}")
    row(f"round 0 ({args.labelled} labelled, {args.teacher_epochs} ep)", 0, 0, history[0].metrics)
    row(f"control (+{args.epochs * args.rounds} epochs, labelled)", 0, 0, control_metrics)
    for r in history[1:]:
        row(f"round {r.round} (+pseudo, conf {args.confidence})", r.pseudo_images, r.pseudo_boxes, r.metrics)
    final = history[-1].metrics["mAP50"]
    print(f"self-training vs control: {final / max(control_metrics['mAP50'], 1e-9):.2f} x mAP50 "
          f"({final:.3f} vs {control_metrics['mAP50']:.3f}); vs round 0: {final - history[0].metrics['mAP50']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

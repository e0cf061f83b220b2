"""The dataset card written with every build: what is in the dataset, how it was made, and where
its boxes are, so a user can judge it before training on it."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

import matplotlib
import numpy as np
import pyarrow as pa

matplotlib.use("Agg")  # files only, no display; matplotlib bundles its fonts (nothing downloaded)
import matplotlib.pyplot as plt  # noqa: E402

from fundus_engine.vocabulary import LESIONS  # noqa: E402
from fundus_engine.vocabulary import CLASS_NAMES  # noqa: E402
from fundus_engine.write import RecordStats  # noqa: E402


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


class BoxStats:
    """The card's box figures, added a shard at a time in fixed-size histograms: boxes per class
    and source, box sizes per class (bins of SIZE_BIN disc diameters, with the exact range), and
    box centres per class on a GRID-unit grid over the 0-999 frame. Memory does not grow with the
    number of boxes."""

    SIZE_BIN = 0.01  # disc diameters
    GRID = 5  # 0-999 units per cell: 200 x 200 cells

    def __init__(self):
        self.per_class: Counter = Counter()
        self.sources: Counter = Counter()  # (class, source)
        self.sizes: dict[str, Counter] = {}  # class -> {bin: boxes}
        self.size_range: dict[str, tuple[float, float]] = {}
        self.centres: dict[str, np.ndarray] = {}  # class -> boxes per cell (y, x)

    def add_table(self, table: pa.Table) -> None:
        """Regions (an Arrow table with the Region columns)."""
        self.add_rows(zip(*(table.column(c).to_pylist() for c in ("label", "source", "size_dd", "box_999"))))

    def add_rows(self, rows: Iterable[tuple]) -> None:
        cells = 1000 // self.GRID
        for label, source, size_dd, box in rows:
            self.per_class[label] += 1
            self.sources[label, source] += 1
            if size_dd is not None:
                self.sizes.setdefault(label, Counter())[int(size_dd // self.SIZE_BIN)] += 1
                lo, hi = self.size_range.get(label, (size_dd, size_dd))
                self.size_range[label] = (min(lo, size_dd), max(hi, size_dd))
            grid = self.centres.get(label)
            if grid is None:
                grid = self.centres[label] = np.zeros((cells, cells), np.int32)
            x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            grid[min(cells - 1, max(0, int(y // self.GRID))), min(cells - 1, max(0, int(x // self.GRID)))] += 1


def plot_box_sizes(boxes: BoxStats, path: Path) -> Path:
    """Box size in disc diameters per class: shows whether small lesions are represented."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in CLASS_NAMES:
        counts = boxes.sizes.get(label)
        if counts:
            lo, hi = boxes.size_range[label]
            bins = np.array(sorted(counts))
            centres = np.clip((bins + 0.5) * boxes.SIZE_BIN, lo, hi)
            ax.hist(centres, bins=30, range=(lo, hi) if hi > lo else None, weights=[counts[b] for b in bins],
                    alpha=0.5, label=f"{label} ({sum(counts.values())})")
    ax.set_xlabel("box size (disc diameters)")
    ax.set_ylabel("boxes")
    if ax.get_legend_handles_labels()[0]:  # a build with no boxes plots an empty chart, no legend
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_box_positions(boxes: BoxStats, path: Path) -> Path:
    """Box centres on the 0-999 grid the answers use, per class: shows positional bias."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label in CLASS_NAMES:
        grid = boxes.centres.get(label)
        if grid is not None and grid.any():
            ys, xs = np.nonzero(grid)
            ax.scatter((xs + 0.5) * boxes.GRID, (ys + 0.5) * boxes.GRID, s=6, alpha=0.6, label=label)
    ax.set_xlim(0, 999)
    ax.set_ylim(999, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("x (0-999)")
    ax.set_ylabel("y (0-999)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_PSEUDONYMS = {  # how the patients' identifiers are kept (`labels.patient_pseudonym`)
    "keyed": " Patients are named by keyed pseudonyms (HMAC-SHA256 with a secret key, key id `{key_id}`).",
    "unkeyed": " Patients are named by unkeyed SHA-256 digests of their identifiers: an identifier from a small "
               "space (a record number) can be matched to its digest by hashing candidates.",
}


def _image_paths(about: dict) -> str:
    """Where the records say the photographs are, and why, when their file names told on patients."""
    found = about.get("identifiers_in_paths") or 0
    if about.get("image_paths") == "content":
        why = f" ({found} of their file paths held the patient's identifier)" if found else ""
        return f" Photographs are named by content hash under `images/`{why}, never by their source path."
    if found:
        return (f" **Warning:** {found} photographs' file paths, which the records name, hold the patient's "
                "identifier (`write.image_paths: source`).")
    return ""


def render_card(out: Path, stats: RecordStats, boxes: BoxStats, about: dict) -> Path:
    """The card from counts alone (`stats`: the records; `boxes`: the regions of the images
    that have records), as the end of a run gathers them shard by shard."""
    card = Path(out) / "card"
    card.mkdir(parents=True, exist_ok=True)
    sizes = plot_box_sizes(boxes, card / "box_sizes.png")
    positions = plot_box_positions(boxes, card / "box_positions.png")

    tasks = stats.task_split
    splits = ("train", "val", "test")
    lines = ["# FundusGen dataset card", "",
             f"{stats.records} instruction records from {len(stats.images)} images, built by Fundus-Engine "
             f"{about.get('engine_version')} on {about.get('created_at')}.", ""]
    detector = about.get("detector", {})
    domain = about.get("detector_domain") or {}
    if domain.get("warning"):
        lines += [f"**Warning:** {domain['warning']}", ""]
    lines += ["## Records per task and split", ""]
    lines += _table(("task", *splits, "all"), [(t, *(tasks[(t, s)] for s in splits), sum(tasks[(t, s)] for s in splits))
                                               for t in sorted({t for t, _ in tasks})])
    images_per_split = stats.images_per_split()
    lines += ["", "## Images per split", ""] + _table(splits, [tuple(images_per_split[s] for s in splits)])
    kind, _, key_id = (about.get("patient_pseudonyms") or "").partition(" ")  # "keyed <key id>", "unkeyed"
    lines += ["", "Splits hold at the patient level and keep near-duplicate photographs (perceptual hash) together."
              + _PSEUDONYMS.get(kind, "").format(key_id=key_id) + _image_paths(about), "", "## Records per language", ""]
    lines += _table(("language", "records"), sorted(stats.languages.items()))
    lines += ["", "## Boxes per class", ""]
    per_class, sources = boxes.per_class, boxes.sources
    lines += _table(("class", "boxes", "from labels", "from the detector", "from the localiser"),
                    [(c, per_class[c], sources[(c, "ground_truth")], sources[(c, "model")], sources[(c, "localiser")])
                     for c in CLASS_NAMES if per_class[c]])
    lines += ["", "Where each stated box was drawn from. Where the detector and the localiser agreed on a landmark and "
              "the detector is not validated on that kind of photograph, the box is the localiser's: the detector "
              "domain section below counts those as `detector+localiser`."]
    lines += ["", "## Diagnoses (images)", ""] + _table(("diagnosis", "images"), sorted(stats.diagnoses.items()))
    lines += ["", "## Box sizes and positions", "", f"![box sizes]({sizes.name})", f"![box positions]({positions.name})",
              "", "## How it was made", "",
              f"- Detector: `{detector.get('weights')}` sha256 `{detector.get('sha256', '')[:16]}`",
              "- Detector validated on: " + ("; ".join(
                  f"{domain} photographs ({', '.join(classes)})" for domain, classes in detector.get("validated_on", {}).items()
                  if classes) or "nothing (no validation in its metadata)"),
              "- Absent findings stated where the labels annotate a class exhaustively, and from the detector only "
              "for (held-out mAP50 on that kind of photograph at or above `expand.negative_min_map50`): "
              + "; ".join(f"{domain} photographs: {', '.join(c for c in classes if c in LESIONS) or 'no class'}"
                          for domain, classes in detector.get("trusted_on", {}).items()),
              f"- Expand backend: {about.get('expand_backend')}"]
    lines += [f"- Prompt `{p['id']}` version {p['version']} sha256 `{p['sha256'][:16]}`" for p in about.get("prompts", [])]
    if domain:
        lines += ["", "## Detector domain", "", f"Images: {domain['images']}; disc from: {domain['disc_source']}; "
                  f"fovea from: {domain['fovea_source']}; mean detector confidence: {domain['detector_mean_confidence']}"]
    lines += ["", "Configuration:", "", "```json", json.dumps(about.get("config", {}), indent=2), "```", ""]
    path = card / "README.md"
    path.write_text("\n".join(lines))
    return path

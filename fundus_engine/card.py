"""The dataset card written with every build: what is in the dataset, how it was made, and where
its boxes are, so a user can judge it before training on it."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; matplotlib bundles its fonts (nothing downloaded)
import matplotlib.pyplot as plt  # noqa: E402

from fundus_engine.models import InstructionRecord, Region  # noqa: E402
from fundus_engine.vocabulary import LESIONS  # noqa: E402
from fundus_engine.vocabulary import CLASS_NAMES  # noqa: E402


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def plot_box_sizes(regions: list[Region], path: Path) -> Path:
    """Box size in disc diameters per class: shows whether small lesions are represented."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in CLASS_NAMES:
        sizes = [r.size_dd for r in regions if r.label == label and r.size_dd is not None]
        if sizes:
            ax.hist(sizes, bins=30, alpha=0.5, label=f"{label} ({len(sizes)})")
    ax.set_xlabel("box size (disc diameters)")
    ax.set_ylabel("boxes")
    if ax.get_legend_handles_labels()[0]:  # a build with no boxes plots an empty chart, no legend
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_box_positions(regions: list[Region], path: Path) -> Path:
    """Box centres on the 0-999 grid the answers use, per class: shows positional bias."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label in CLASS_NAMES:
        centres = [((r.box_999[0] + r.box_999[2]) / 2, (r.box_999[1] + r.box_999[3]) / 2)
                   for r in regions if r.label == label]
        if centres:
            xs, ys = zip(*centres)
            ax.scatter(xs, ys, s=6, alpha=0.6, label=label)
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


def write_card(out: Path, records: list[InstructionRecord], regions: list[Region], about: dict) -> Path:
    """OUT/card/README.md with counts per task, class, split and language, the box plots, and
    the config, models and prompt versions (`about`: the manifest's provenance part)."""
    card = Path(out) / "card"
    card.mkdir(parents=True, exist_ok=True)
    used = {r.sha256 for r in records}
    regions = [r for r in regions if r.sha256 in used]
    sizes = plot_box_sizes(regions, card / "box_sizes.png")
    positions = plot_box_positions(regions, card / "box_positions.png")

    tasks = Counter((r.task, r.split) for r in records)
    splits = ("train", "val", "test")
    lines = [f"# FundusGen dataset card", "",
             f"{len(records)} instruction records from {len(used)} images, built by Fundus-Engine "
             f"{about.get('engine_version')} on {about.get('created_at')}.", ""]
    detector = about.get("detector", {})
    domain = about.get("detector_domain") or {}
    if domain.get("warning"):
        lines += [f"**Warning:** {domain['warning']}", ""]
    lines += ["## Records per task and split", ""]
    lines += _table(("task", *splits, "all"), [(t, *(tasks[(t, s)] for s in splits), sum(tasks[(t, s)] for s in splits))
                                               for t in sorted({t for t, _ in tasks})])
    images_per_split = Counter(s for _, s in {(r.sha256, r.split) for r in records})
    lines += ["", "## Images per split", ""] + _table(splits, [tuple(images_per_split[s] for s in splits)])
    lines += ["", "Splits hold at the patient level and keep near-duplicate photographs (perceptual hash) together.",
              "", "## Records per language", ""]
    lines += _table(("language", "records"), sorted(Counter(r.language for r in records).items()))
    lines += ["", "## Boxes per class", ""]
    per_class = Counter(r.label for r in regions)
    sources = Counter((r.label, r.source) for r in regions)
    lines += _table(("class", "boxes", "from labels", "from the detector", "from the localiser"),
                    [(c, per_class[c], sources[(c, "ground_truth")], sources[(c, "model")], sources[(c, "localiser")])
                     for c in CLASS_NAMES if per_class[c]])
    diagnoses = Counter(r.diagnosis or "not determined from the evidence available" for r in records
                        if r.task == "cognitive_chain" and r.language == "en")
    lines += ["", "## Diagnoses (images)", ""] + _table(("diagnosis", "images"), sorted(diagnoses.items()))
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

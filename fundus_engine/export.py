"""Export: the built Parquet dataset in the file formats training and evaluation tools read.

The Parquet dataset (`OUT/dataset/{split}-NNNNN.parquet`) is the source of truth; these files
are derived from it, so they are rewritten whole on every export and can always be regenerated.

- InternVL 2.5 fine-tune (`exports/internvl/`): what FundusExpert trained on; jsonl + meta json.
- LLaVA (`exports/llava/`): a JSON list with paths relative to `--image_folder`.
- LLaMA-Factory (`exports/llamafactory/`): sharegpt "messages"/"images" + `dataset_info.json`.
- VLMEvalKit (`to_vlmevalkit_tsv`): the custom multiple-choice TSV, for the held-out benchmark.

Every record is validated through `InstructionRecord` on the way out and its turns are checked
(human first, human/gpt alternating, exactly one image placeholder at the start), because a
malformed sample fails late and expensively inside a training job. Output order is by split,
then record_id, so two exports of the same build are byte-identical.
"""
from __future__ import annotations

import base64
import csv
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow.dataset as pads
from PIL import Image
from pydantic import ValidationError

from fundus_engine.models import BenchmarkQuestion, InstructionRecord
from fundus_engine.tables import arrow_schema

SPLITS = ("train", "val", "test")
IMAGE_TOKEN = "<image>"
_LEADING_IMAGE = re.compile(r"^\s*<image>\s*")
# Strings pandas.read_csv (which VLMEvalKit uses) turns into NaN by default: an option with such
# a text would silently vanish from the question, so refuse to write it.
_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
# GMAI-MMBench's columns (VLMEvalKit groups its accuracy by `clinical vqa task`, `department` and
# `perceptual granularity`); `l2-category` repeats the task for VLMEvalKit's generic MCQ report.
TSV_COLUMNS = ("index", "question", "A", "B", "C", "D", "E", "answer", "category", "l2-category",
               "clinical vqa task", "department", "perceptual granularity", "modality")


class ExportError(ValueError):
    """A record that cannot be exported as it stands; the message names it."""


# ------------------------------------------------------------------ reading

def dataset_files(out: Path) -> list[Path]:
    return sorted((Path(out) / "dataset").glob("*.parquet"))


def present_splits(out: Path) -> tuple[str, ...]:
    """Splits that have at least one record, in train/val/test order."""
    files = dataset_files(out)
    if not files:
        return ()
    table = pads.dataset([str(f) for f in files], format="parquet",
                         schema=arrow_schema(InstructionRecord)).to_table(columns=["split"])
    found = set(table.column("split").to_pylist())
    return tuple(s for s in SPLITS if s in found)


def load_records(out: Path, splits: Sequence[str] | None = None) -> list[InstructionRecord]:
    """Records of `splits` (default: all), validated, sorted by (split, record_id); ids must be unique.

    A split asked for by name must have records: an empty training file would fail only later.
    """
    files = dataset_files(out)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {Path(out) / 'dataset'}: run a build first")
    wanted = SPLITS if splits is None else tuple(splits)
    unknown = set(wanted) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {SPLITS}")
    dataset = pads.dataset([str(f) for f in files], format="parquet", schema=arrow_schema(InstructionRecord))
    rows = dataset.to_table(filter=pads.field("split").isin(list(wanted))).to_pylist()
    records = []
    for row in rows:
        try:
            records.append(InstructionRecord.model_validate(row))
        except ValidationError as e:
            raise ExportError(f"record {row.get('record_id')!r} is malformed: {e}") from e
    records.sort(key=lambda r: (SPLITS.index(r.split), r.record_id))
    seen: set[str] = set()
    for r in records:
        if r.record_id in seen:
            raise ExportError(f"duplicate record_id {r.record_id!r}: sample ids must be unique")
        seen.add(r.record_id)
    for split in splits or ():
        if not any(r.split == split for r in records):
            raise ExportError(f"no records in split {split!r} under {Path(out) / 'dataset'}")
    return records


# ------------------------------------------------------------------ shared helpers

def _turns(record: InstructionRecord) -> list[tuple[str, str]]:
    """(from, text) pairs with the image placeholder removed, after checking the turn structure.

    The placeholder is taken off the first human turn so each format can put back its own; one
    anywhere else would give a sample with more image tokens than images, which trainers reject.
    """
    turns = [(t.from_, t.value) for t in record.conversations]
    expected = ["human" if i % 2 == 0 else "gpt" for i in range(len(turns))]
    if [f for f, _ in turns] != expected or len(turns) % 2:
        raise ExportError(f"record {record.record_id!r}: turns must alternate human/gpt starting with human "
                          f"and end with gpt, got {[f for f, _ in turns]}")
    first = _LEADING_IMAGE.sub("", turns[0][1], count=1)
    turns[0] = (turns[0][0], first)
    for i, (_, text) in enumerate(turns):
        if IMAGE_TOKEN in text:
            raise ExportError(f"record {record.record_id!r}: stray {IMAGE_TOKEN} in turn {i}; "
                              "one image per sample, at the start of the first human turn")
        if not text.strip():
            raise ExportError(f"record {record.record_id!r}: turn {i} is empty")
    return turns


def _image(record: InstructionRecord, out: Path) -> Path:
    """Absolute path of the image the model sees; relative paths are taken as relative to the build."""
    path = Path(record.image_path)
    if not path.is_absolute():
        path = Path(out) / path
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"record {record.record_id!r}: image {path} does not exist")
    return path


def image_root(paths: Iterable[Path]) -> Path:
    """Deepest folder holding every image: the InternVL `root` / LLaVA `--image_folder`."""
    parents = sorted({str(p.parent) for p in paths})
    if not parents:
        raise ExportError("no images to export")
    return Path(os.path.commonpath(parents))


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _write_text(path: Path, text: str) -> Path:
    """Atomic, like the dataset writer: a killed export never leaves a truncated file that looks whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def _clean(directory: Path, patterns: Sequence[str]) -> None:
    """Remove files of an earlier export, so a split no longer exported cannot linger."""
    for pattern in patterns:
        for old in directory.glob(pattern):
            old.unlink()


def _prepare(out: Path, splits: Sequence[str]) -> tuple[list[tuple[InstructionRecord, list[tuple[str, str]], Path]], Path]:
    records = load_records(out, splits)
    items = [(r, _turns(r), _image(r, out)) for r in records]
    return items, image_root(p for _, _, p in items)


# ------------------------------------------------------------------ InternVL

def to_internvl(out: Path, splits: Sequence[str] = ("train",)) -> Path:
    """InternVL 2.5 fine-tune data (the format FundusExpert trained on); returns `exports/internvl/`.

    Writes `fundusgen_<split>.jsonl` and one `meta_<split>.json` per split (InternVL trains on
    every entry of the meta file it is given, so the splits are kept in separate meta files).
    """
    out = Path(out)
    items, root = _prepare(out, splits)
    directory = out / "exports" / "internvl"
    directory.mkdir(parents=True, exist_ok=True)
    _clean(directory, ("fundusgen_*.jsonl", "meta_*.json"))
    sizes: dict[Path, tuple[int, int]] = {}
    for split in splits:
        lines = []
        for record, turns, path in (i for i in items if i[0].split == split):
            if path not in sizes:
                with Image.open(path) as im:  # reads the header only
                    sizes[path] = im.size
            width, height = sizes[path]
            conversations = [{"from": f, "value": (IMAGE_TOKEN + "\n" + text) if n == 0 else text}
                             for n, (f, text) in enumerate(turns)]
            lines.append(json.dumps({"id": record.record_id, "image": _relative(path, root), "width": width,
                                     "height": height, "conversations": conversations}, ensure_ascii=False))
        annotation = _write_text(directory / f"fundusgen_{split}.jsonl", "".join(line + "\n" for line in lines))
        _write_text(directory / f"meta_{split}.json", _dump({f"fundusgen_{split}": {
            "root": str(root), "annotation": str(annotation.resolve()), "data_augment": False,
            "repeat_time": 1, "length": len(lines)}}))
    return directory


# ------------------------------------------------------------------ LLaVA

def to_llava(out: Path, splits: Sequence[str] = ("train",)) -> Path:
    """LLaVA / ShareGPT JSON lists, images relative to one `--image_folder`; returns `exports/llava/`.

    The folder is written to `README.md` (and is `image_root` of the exported images).
    """
    out = Path(out)
    items, root = _prepare(out, splits)
    directory = out / "exports" / "llava"
    directory.mkdir(parents=True, exist_ok=True)
    _clean(directory, ("fundusgen_*.json", "README.md"))
    files = []
    for split in splits:
        samples = [{"id": record.record_id, "image": _relative(path, root),
                    "conversations": [{"from": f, "value": (IMAGE_TOKEN + "\n" + text) if n == 0 else text}
                                      for n, (f, text) in enumerate(turns)]}
                   for record, turns, path in items if record.split == split]
        files.append(_write_text(directory / f"fundusgen_{split}.json", _dump(samples)))
    readme = ["# Fundus-Engine export for LLaVA", "",
              "Image paths are relative to the image folder; pass it to LLaVA's training script:", "",
              f"--image_folder {root}", ""]
    by_split = dict(zip(splits, files))
    if "train" in by_split:  # LLaVA takes one --data_path: the training split, never val or test
        readme += [f"--data_path {by_split['train'].resolve()}", ""]
    readme += [f"The {split} split, for evaluation only (not a second --data_path): {f.resolve()}"
               for split, f in by_split.items() if split != "train"]
    _write_text(directory / "README.md", "\n".join(readme) + "\n")
    return directory


# ------------------------------------------------------------------ LLaMA-Factory

def to_llamafactory(out: Path, splits: Sequence[str] = ("train",)) -> Path:
    """LLaMA-Factory sharegpt multimodal data + `dataset_info.json`; returns `exports/llamafactory/`.

    Image paths are absolute, so training works whatever `dataset_dir`/`media_dir` is; each sample
    has one `<image>` token and one image, the equality LLaMA-Factory's multimodal plugin checks.
    """
    out = Path(out)
    items, _ = _prepare(out, splits)
    directory = out / "exports" / "llamafactory"
    directory.mkdir(parents=True, exist_ok=True)
    _clean(directory, ("fundusgen_*.json", "dataset_info.json"))
    roles = {"human": "user", "gpt": "assistant"}
    info = {}
    for split in splits:
        samples = [{"messages": [{"role": roles[f], "content": (IMAGE_TOKEN + text) if n == 0 else text}
                                 for n, (f, text) in enumerate(turns)],
                    "images": [str(path)]}
                   for record, turns, path in items if record.split == split]
        name = f"fundusgen_{split}.json"
        _write_text(directory / name, _dump(samples))
        info[f"fundusgen_{split}"] = {
            "file_name": name, "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    _write_text(directory / "dataset_info.json", _dump(info))
    return directory


# ------------------------------------------------------------------ all formats

def export_all(out: Path) -> dict[str, Path]:
    """InternVL, LLaVA and LLaMA-Factory exports of every split the build has."""
    splits = present_splits(out)
    if not splits:
        raise ExportError(f"no records under {Path(out) / 'dataset'}: nothing to export")
    return {"internvl": to_internvl(out, splits), "llava": to_llava(out, splits),
            "llamafactory": to_llamafactory(out, splits)}


# ------------------------------------------------------------------ VLMEvalKit

def _jpeg_base64(path: Path) -> str:
    """VLMEvalKit decodes `image` as base64 JPEG: JPEG files go as they are, others are re-encoded."""
    data = path.read_bytes()
    if not data.startswith(b"\xff\xd8\xff"):
        from io import BytesIO
        buffer = BytesIO()
        with Image.open(path) as im:
            im.convert("RGB").save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii")


def to_vlmevalkit_tsv(questions: Iterable[BenchmarkQuestion | dict], path: Path, embed_images: bool = False) -> Path:
    """The benchmark as a VLMEvalKit custom MCQ TSV, read back with `pandas.read_csv(sep="\\t")`.

    Columns: index, question, A-E (empty when absent, which pandas reads as NaN and VLMEvalKit
    treats as no option), answer, category, l2-category and clinical vqa task (both the clinical
    task), department, perceptual granularity, modality, then
    `image_path` (absolute) or, with `embed_images`, `image` (base64 JPEG) for a self-contained
    file. Tabs and newlines in text are kept by CSV quoting, which pandas undoes.
    """
    path = Path(path)
    rows = sorted((BenchmarkQuestion.model_validate(q if isinstance(q, dict) else q.model_dump()) for q in questions),
                  key=lambda q: q.index)
    indices = [q.index for q in rows]
    if len(set(indices)) != len(indices):
        raise ExportError("benchmark question indices must be unique")
    header = [*TSV_COLUMNS, "image" if embed_images else "image_path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            writer.writerow(header)
            for q in rows:
                writer.writerow(_tsv_row(q, embed_images))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def _tsv_row(q: BenchmarkQuestion, embed_images: bool) -> list:
    """One TSV row, refusing what VLMEvalKit would misread rather than letting it score wrongly."""
    if getattr(q, q.answer) is None:
        raise ExportError(f"question {q.index}: answer {q.answer} names an absent option")
    for field in ("question", "A", "B", "C", "D", "E", "category", "clinical_task"):
        value = getattr(q, field)
        if value is not None and value.strip() in _PANDAS_NA:
            raise ExportError(f"question {q.index}: {field} {value!r} would be read as missing by pandas")
    image = Path(os.path.abspath(q.image_path))
    if not image.is_file():
        raise FileNotFoundError(f"question {q.index}: image {image} does not exist")
    return [q.index, q.question, q.A, q.B, q.C or "", q.D or "", q.E or "", q.answer, q.category,
            q.clinical_task, q.clinical_task, q.department, q.granularity, q.modality,
            _jpeg_base64(image) if embed_images else str(image)]

"""fundus_engine.export: a hand-made two-split dataset exported to each training format and checked
field by field against the format's spec; the Parquet dataset loaded by Hugging Face `datasets`."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fundus_engine.export import (ExportError, export_all, image_root, load_records,
                                  present_splits, to_internvl, to_llamafactory, to_llava, to_vlmevalkit_tsv)
from fundus_engine.models import BenchmarkQuestion, GroundedBox, InstructionRecord, Provenance, Turn
from fundus_engine.tables import arrow_schema, write_rows

PROVENANCE = Provenance(backend="offline", model="knowledge-table", prompt_id="expand.offline", prompt_version="1.0",
                        prompt_sha256="0" * 64, engine_version="0.0.0")


def _image(path: Path, colour=(180, 60, 30), size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _record(record_id: str, split: str, image: Path, source: Path, task="disease_diagnosis",
            question="<image>\nWhat is the condition demonstrated?", answer="Diabetic retinopathy", **kw):
    return InstructionRecord(
        record_id=record_id, sha256=record_id.ljust(64, "0"), image_path=str(image), source_image_path=str(source),
        task=task, conversations=[Turn(**{"from": "human", "value": question}), Turn(**{"from": "gpt", "value": answer})],
        split=split, template_id="chain.diagnosis", template_version="1.0", provenance=PROVENANCE, **kw)


@pytest.fixture
def build(tmp_path) -> Path:
    """A build folder as write_dataset leaves it: source photos under input/, a box-marked copy under
    out/crops/, records written unsorted across two shards of train and one of val."""
    out = tmp_path / "out"
    a = _image(tmp_path / "input" / "images" / "a.jpg")
    b = _image(tmp_path / "input" / "images" / "sub" / "b.png", (30, 90, 160), (80, 60))
    c = _image(tmp_path / "input" / "images" / "c.jpg", (90, 90, 90))
    marked = _image(out / "crops" / "aa" / "r1.marked.jpg", (0, 255, 0))
    train = [
        _record("t3", "train", a, a, task="report_generation",
                question="<image>\nPlease describe the fundus image in detail.",
                answer="Overview: right eye.\nFindings:\tHard exudates temporal to the fovea."),
        _record("t1", "train", marked, a, task="region_identification",
                question="<image>\nWhat does the green box in this fundus image show?", answer="Hard exudate",
                boxes=[GroundedBox(label="hard_exudate", box_999=[10, 20, 30, 40])]),
        _record("t2", "train", b, b, task="region_detection", question="Locate the optic disc.",  # no placeholder
                answer="<ref>Optic disc</ref><box>[[162, 388, 312, 545]]</box>"),
    ]
    write_rows(out / "dataset" / "train-00000.parquet", train[:2], InstructionRecord)
    write_rows(out / "dataset" / "train-00001.parquet", train[2:], InstructionRecord)
    write_rows(out / "dataset" / "val-00000.parquet",
               [_record("v1", "val", c, c, question="<image>\nWhich disease does this fundus photograph show?",
                        answer="Glaucoma")], InstructionRecord)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------ reading

def test_records_are_validated_and_ordered_by_split_then_id(build):
    assert present_splits(build) == ("train", "val")
    records = load_records(build)
    assert [(r.split, r.record_id) for r in records] == [("train", "t1"), ("train", "t2"), ("train", "t3"),
                                                         ("val", "v1")]
    assert [r.record_id for r in load_records(build, ["val"])] == ["v1"]
    with pytest.raises(ExportError, match="no records in split 'test'"):
        load_records(build, ["test"])
    with pytest.raises(ValueError, match="unknown split"):
        load_records(build, ["dev"])


def test_hugging_face_datasets_reads_the_parquet_dataset(build, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = {"train": sorted(str(p) for p in (build / "dataset").glob("train-*.parquet")),
             "validation": [str(build / "dataset" / "val-00000.parquet")]}
    loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf-cache"))
    assert loaded["train"].num_rows == 3 and loaded["validation"].num_rows == 1
    expected = {r.record_id: r for r in load_records(build)}
    for split in ("train", "validation"):
        for row in loaded[split]:
            record = expected.pop(row["record_id"])
            assert row["conversations"] == [t.model_dump(by_alias=True) for t in record.conversations]
            assert InstructionRecord.model_validate(row) == record  # every column survives the round trip
    assert not expected


def _replace_extra_shard(build, row: dict) -> None:
    pq.write_table(pa.Table.from_pylist([row], schema=arrow_schema(InstructionRecord)),
                   build / "dataset" / "val-00001.parquet")


def test_malformed_rows_and_missing_images_stop_the_export(build):
    good = pq.read_table(build / "dataset" / "val-00000.parquet").to_pylist()[0]
    bad = {**good, "record_id": "bad", "task": "not_a_task"}
    _replace_extra_shard(build, bad)
    with pytest.raises(ExportError, match="record 'bad' is malformed"):
        to_internvl(build, ["val"])

    stray = {**good, "record_id": "stray", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                             {"from": "gpt", "value": "See <image>"}]}
    _replace_extra_shard(build, stray)
    with pytest.raises(ExportError, match="stray <image>"):
        to_llamafactory(build, ["val"])

    reversed_turns = {**good, "record_id": "rev", "conversations": [{"from": "gpt", "value": "A"},
                                                                    {"from": "human", "value": "Q?"}]}
    _replace_extra_shard(build, reversed_turns)
    with pytest.raises(ExportError, match="alternate human/gpt"):
        to_llava(build, ["val"])

    dup = {**good}
    _replace_extra_shard(build, dup)
    with pytest.raises(ExportError, match="duplicate record_id 'v1'"):
        to_llava(build, ["val"])

    (build / "dataset" / "val-00001.parquet").unlink()
    Path(good["image_path"]).unlink()
    with pytest.raises(FileNotFoundError, match="c.jpg does not exist"):
        to_internvl(build, ["val"])


# ------------------------------------------------------------------ InternVL

def test_internvl_jsonl_and_meta(build):
    directory = to_internvl(build, ("train", "val"))
    assert directory == build / "exports" / "internvl"
    assert sorted(p.name for p in directory.iterdir()) == ["fundusgen_train.jsonl", "fundusgen_val.jsonl",
                                                           "meta_train.json", "meta_val.json"]
    records = {r.record_id: r for r in load_records(build)}
    for split, ids in (("train", ["t1", "t2", "t3"]), ("val", ["v1"])):
        meta = json.loads((directory / f"meta_{split}.json").read_text())
        assert list(meta) == [f"fundusgen_{split}"]
        entry = meta[f"fundusgen_{split}"]
        assert set(entry) == {"root", "annotation", "data_augment", "repeat_time", "length"}
        assert entry["data_augment"] is False and entry["repeat_time"] == 1
        root, annotation = Path(entry["root"]), Path(entry["annotation"])
        assert root.is_absolute() and annotation.is_absolute()
        assert annotation == (directory / f"fundusgen_{split}.jsonl").resolve()
        lines = _jsonl(annotation)
        assert entry["length"] == len(lines) == len(ids)
        assert [line["id"] for line in lines] == ids
        for line in lines:
            record = records[line["id"]]
            assert set(line) == {"id", "image", "width", "height", "conversations"}
            assert not Path(line["image"]).is_absolute()
            image = root / line["image"]
            assert image.is_file() and image.resolve() == Path(record.image_path).resolve()
            with Image.open(image) as im:
                assert (line["width"], line["height"]) == im.size
            turns = line["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] and all(set(t) == {"from", "value"} for t in turns)
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert turns[0]["value"].startswith("<image>\n") and not turns[0]["value"].startswith("<image>\n<image>")
            assert turns[0]["value"].removeprefix("<image>\n") == \
                record.conversations[0].value.removeprefix("<image>\n")
            assert turns[1]["value"] == record.conversations[1].value
    # The marked copy lives under out/crops, the photos under input/: root is their common folder.
    assert Path(json.loads((directory / "meta_train.json").read_text())["fundusgen_train"]["root"]) == \
        build.parent
    t3 = _jsonl(directory / "fundusgen_train.jsonl")[2]
    assert t3["conversations"][1]["value"] == "Overview: right eye.\nFindings:\tHard exudates temporal to the fovea."

    # Re-exporting only train removes the val files of the earlier export; output is deterministic.
    before = (directory / "fundusgen_train.jsonl").read_bytes()
    to_internvl(build)
    assert sorted(p.name for p in directory.iterdir()) == ["fundusgen_train.jsonl", "meta_train.json"]
    assert (directory / "fundusgen_train.jsonl").read_bytes() == before


# ------------------------------------------------------------------ LLaVA

def llava_image_folder(export_dir: Path) -> Path:
    """The `--image_folder` recorded in an LLaVA export's README."""
    line = next(x for x in (export_dir / "README.md").read_text().splitlines() if x.startswith("--image_folder "))
    return Path(line.split(" ", 1)[1])


def test_llava_json(build):
    directory = to_llava(build, ("train", "val"))
    folder = llava_image_folder(directory)
    assert folder.is_absolute() and folder == image_root(Path(r.image_path) for r in load_records(build))
    readme = (directory / "README.md").read_text()
    assert f"--data_path {(directory / 'fundusgen_train.json').resolve()}" in readme
    assert readme.count("--data_path /") == 1  # pasting the README never trains on val
    assert f"evaluation only (not a second --data_path): {(directory / 'fundusgen_val.json').resolve()}" in readme
    ids = []
    for split in ("train", "val"):
        samples = json.loads((directory / f"fundusgen_{split}.json").read_text())
        assert isinstance(samples, list)
        for s in samples:
            assert set(s) == {"id", "image", "conversations"}
            assert (folder / s["image"]).is_file() and not Path(s["image"]).is_absolute()
            assert [t["from"] for t in s["conversations"]] == ["human", "gpt"]
            assert s["conversations"][0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in s["conversations"]) == 1
            ids.append(s["id"])
    assert ids == ["t1", "t2", "t3", "v1"] and len(set(ids)) == len(ids)


# ------------------------------------------------------------------ LLaMA-Factory

def test_llamafactory_sharegpt_and_dataset_info(build, tmp_path):
    directory = to_llamafactory(build, ("train", "val"))
    info = json.loads((directory / "dataset_info.json").read_text())
    assert info == {f"fundusgen_{split}": {
        "file_name": f"fundusgen_{split}.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
        for split in ("train", "val")}
    records = {r.record_id: r for r in load_records(build)}
    for split, ids in (("train", ["t1", "t2", "t3"]), ("val", ["v1"])):
        samples = json.loads((directory / info[f"fundusgen_{split}"]["file_name"]).read_text())
        assert len(samples) == len(ids)
        for sample, record_id in zip(samples, ids):
            assert set(sample) == {"messages", "images"}
            messages, images = sample["messages"], sample["images"]
            assert [m["role"] for m in messages] == ["user", "assistant"]
            assert all(set(m) == {"role", "content"} for m in messages)
            assert sum(m["content"].count("<image>") for m in messages) == len(images) == 1
            assert messages[0]["content"].startswith("<image>") and "<image>" not in messages[1]["content"]
            assert Path(images[0]).is_absolute() and Path(images[0]).is_file()
            assert Path(images[0]) == Path(records[record_id].image_path).resolve()
            assert messages[1]["content"] == records[record_id].conversations[1].value

    # LLaMA-Factory loads local files with datasets' json builder: the file must load as a table.
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("json", data_files=str(directory / "fundusgen_train.json"),
                                   cache_dir=str(tmp_path / "hf-cache"))["train"]
    assert loaded.column_names == ["messages", "images"] and loaded.num_rows == 3


def test_export_all_covers_the_splits_present(build):
    paths = export_all(build)
    assert paths == {"internvl": build / "exports" / "internvl", "llava": build / "exports" / "llava",
                     "llamafactory": build / "exports" / "llamafactory"}
    assert (paths["internvl"] / "meta_val.json").is_file() and not (paths["internvl"] / "meta_test.json").exists()
    assert set(json.loads((paths["llamafactory"] / "dataset_info.json").read_text())) == {"fundusgen_train",
                                                                                         "fundusgen_val"}
    assert sorted(p.name for p in paths["llava"].iterdir()) == ["README.md", "fundusgen_train.json",
                                                                "fundusgen_val.json"]
    assert not list(build.glob("exports/**/*.tmp"))


# ------------------------------------------------------------------ VLMEvalKit

def _questions(tmp_path) -> list[BenchmarkQuestion]:
    jpg = _image(tmp_path / "bench" / "q1.jpg")
    png = _image(tmp_path / "bench" / "q2.png", (20, 200, 20))
    return [
        BenchmarkQuestion(index=2, question="What does the green box show?\tAnswer with one option.",
                          A="Hard exudate", B="Drusen", C="Cotton-wool spot", answer="A", category="Hard exudate",
                          clinical_task="Attribute Recognition", granularity="Box level", image_path=str(png),
                          sha256="b" * 64),
        BenchmarkQuestion(index=1, question="What is the grading of diabetic retinopathy?\nChoose one.",
                          A="No DR", B="Mild NPDR", C='Moderate "NPDR"', D="Severe NPDR", E="Proliferative DR",
                          answer="C", category="Moderate non-proliferative diabetic retinopathy",
                          clinical_task="Severity Grading", granularity="Image level", image_path=str(jpg),
                          sha256="a" * 64),
    ]


def test_vlmevalkit_tsv_reads_back_with_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    questions = _questions(tmp_path)
    path = to_vlmevalkit_tsv(questions, tmp_path / "eval" / "FundusBench.tsv")
    frame = pd.read_csv(path, sep="\t")  # exactly how VLMEvalKit loads a TSV
    assert list(frame.columns) == ["index", "question", "A", "B", "C", "D", "E", "answer", "category",
                                   "l2-category", "clinical vqa task", "department", "perceptual granularity",
                                   "modality", "image_path"]
    assert frame["index"].tolist() == [1, 2]
    by_index = {q.index: q for q in questions}
    for _, row in frame.iterrows():
        q = by_index[int(row["index"])]
        assert row["question"] == q.question  # the tab and the newline survive
        assert row["answer"] == q.answer and row["category"] == q.category
        assert row["l2-category"] == row["clinical vqa task"] == q.clinical_task
        assert row["perceptual granularity"] == q.granularity and row["department"] == "ophthalmology"
        assert row["modality"] == "fundus photography"
        for letter in "ABCDE":
            expected = getattr(q, letter)
            assert (pd.isna(row[letter]) if expected is None else row[letter] == expected)
        assert Path(row["image_path"]).is_absolute() and Path(row["image_path"]) == Path(q.image_path)
    with path.open(newline="") as f:  # and with the csv module
        assert len(list(csv.reader(f, delimiter="\t"))) == 3


def test_vlmevalkit_tsv_embeds_base64_jpeg(tmp_path):
    pd = pytest.importorskip("pandas")
    questions = _questions(tmp_path)
    frame = pd.read_csv(to_vlmevalkit_tsv(questions, tmp_path / "embedded.tsv", embed_images=True), sep="\t")
    assert "image" in frame.columns and "image_path" not in frame.columns
    for _, row in frame.iterrows():
        data = base64.b64decode(row["image"])
        assert data[:3] == b"\xff\xd8\xff"  # the PNG question was re-encoded
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.size == (64, 48)
    assert base64.b64decode(frame.loc[frame["index"] == 1, "image"].iloc[0]) == \
        Path(questions[1].image_path).read_bytes()  # a JPEG goes as it is


def test_vlmevalkit_tsv_refuses_what_would_be_misread(tmp_path):
    q = _questions(tmp_path)[0]
    with pytest.raises(ExportError, match="would be read as missing"):
        to_vlmevalkit_tsv([q.model_copy(update={"B": "None"})], tmp_path / "x.tsv")
    with pytest.raises(ExportError, match="absent option"):
        to_vlmevalkit_tsv([q.model_copy(update={"answer": "E"})], tmp_path / "x.tsv")
    with pytest.raises(ExportError, match="unique"):
        to_vlmevalkit_tsv([q, q], tmp_path / "x.tsv")
    assert not (tmp_path / "x.tsv").exists()


def test_multi_turn_samples_keep_one_image_token_on_the_first_turn(tmp_path):
    out = tmp_path / "out"
    image = _image(tmp_path / "input" / "d.jpg")
    turns = [("human", "<image>\nWhat is the image quality?"), ("gpt", "Good."),
             ("human", "Where is the optic disc?"), ("gpt", "<ref>Optic disc</ref><box>[[700, 400, 820, 540]]</box>")]
    record = _record("m1", "train", image, image).model_copy(
        update={"conversations": [Turn(**{"from": f, "value": v}) for f, v in turns]})
    write_rows(out / "dataset" / "train-00000.parquet", [record], InstructionRecord)
    paths = export_all(out)
    internvl = _jsonl(paths["internvl"] / "fundusgen_train.jsonl")[0]["conversations"]
    assert [t["from"] for t in internvl] == ["human", "gpt", "human", "gpt"]
    assert [t["value"].count("<image>") for t in internvl] == [1, 0, 0, 0]
    assert [t["value"] for t in internvl[1:]] == [v for _, v in turns[1:]]
    sample = json.loads((paths["llamafactory"] / "fundusgen_train.json").read_text())[0]
    assert [m["role"] for m in sample["messages"]] == ["user", "assistant", "user", "assistant"]
    assert sum(m["content"].count("<image>") for m in sample["messages"]) == len(sample["images"]) == 1
    assert sample["messages"][0]["content"] == "<image>What is the image quality?"

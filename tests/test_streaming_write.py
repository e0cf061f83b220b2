"""The end of a run streams: `runner.finish_build` reads the stage files a shard at a time and
writes the same dataset, manifest counts, card, benchmark and detector-domain report as the
in-memory way it replaced (every row of every shard read at once, then split, sorted, counted),
which is recomputed here from the same stage files as the reference."""
from __future__ import annotations

import random
import shutil
import time
from collections import Counter
from pathlib import Path

import cv2
import pyarrow.parquet as pq
import pytest

from fundus_engine import mcq, runner, tables, write
from fundus_engine.config import BuildConfig, WriteConfig
from fundus_engine.models import Anatomy, ImageRecord, InstructionRecord, Region
from fundus_engine.runner import RunContext, finish_build, plan_build
from fundus_engine.synth import generate
from fundus_engine.tables import read_rows, write_rows
from in_memory import domain_report, run_local, write_card, write_dataset

PROVENANCE_KEYS = ("engine_version", "created_at", "input_dir", "output_dir", "config", "detector", "expand_backend",
                   "prompts")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A multi-shard build's stage files: 14 labelled photographs (7 patients), 4 unlabelled ones
    (detector boxes) and a resized copy of one (a near-duplicate), 3 images to a shard."""
    root = tmp_path_factory.mktemp("streaming")
    source, out = root / "in", root / "out"
    generate(source, 14, seed=43, size=256, full_labels=True)
    scratch = root / "unlabelled"
    generate(scratch, 4, seed=44, size=256)
    (source / "unlabelled").mkdir()
    for image in sorted((scratch / "images").glob("*.jpg")):
        shutil.copy(image, source / "unlabelled" / image.name)
    original = cv2.imread(str(sorted((source / "images").glob("*.jpg"))[2]))
    (source / "copies").mkdir()
    cv2.imwrite(str(source / "copies" / "smaller.jpg"), cv2.resize(original, (300, 300), interpolation=cv2.INTER_AREA))
    config = BuildConfig(shard_size=3, write=WriteConfig(rows_per_file=100, test_fraction=0.25, val_fraction=0.2))
    ctx = RunContext.create(source, out, config, run_id="streaming-run")
    plan = plan_build(ctx)
    outcomes = run_local(ctx, plan)
    assert all(o.completion for o in outcomes)
    return ctx, plan, outcomes


def _files(outcomes, stage: str, table: str) -> list[Path]:
    return [Path(o.completion.files[table]) for o in sorted(outcomes, key=lambda o: o.shard) if o.stage == stage]


def _in_memory(ctx, outcomes) -> dict:
    """What the end of a run wrote before it streamed: every row of every shard read at once."""
    images = read_rows(_files(outcomes, "ingest", "images"), ImageRecord)
    anatomies = read_rows(_files(outcomes, "crop", "anatomy"), Anatomy)
    regions = read_rows(_files(outcomes, "crop", "regions"), Region)
    split_of = write.split_images(images, ctx.config.write)
    records = [r.model_copy(update={"split": split_of[r.sha256]})
               for r in read_rows(_files(outcomes, "chain", "records"), InstructionRecord)]
    flagged = [r for r in records if r.flags]
    if ctx.config.expand.drop_flagged:
        records = [r for r in records if not r.flags]
    files = {}
    for split in write.SPLITS:
        rows = sorted((r for r in records if r.split == split), key=lambda r: (r.sha256, r.task, r.record_id))
        size = ctx.config.write.rows_per_file
        for n, start in enumerate(range(0, len(rows), size)):
            files[f"{split}-{n:05d}.parquet"] = [r.model_dump(mode="json", by_alias=True) for r in rows[start:start + size]]
    held_out = {r.sha256 for r in records if r.split == "test"}
    return {
        "images": images, "anatomies": anatomies, "regions": regions, "records": records, "files": files,
        "summary": {
            "records": len(records), "images": len({r.sha256 for r in records}),
            "records_per_task": dict(sorted(Counter(r.task for r in records).items())),
            "records_per_split": dict(sorted(Counter(r.split for r in records).items())),
            "images_per_split": dict(sorted(Counter(s for _, s in {(r.sha256, r.split) for r in records}).items())),
        },
        "flagged": len(flagged),
        "flags": dict(sorted(Counter(f.split(":")[0] for r in flagged for f in r.flags).items())),
        "domain": domain_report(images, anatomies, regions, ctx.evidence),
        "questions": mcq.build_benchmark(images, anatomies, regions, held_out, seed=ctx.config.chain.seed),
    }


def _assert_same_as_in_memory(ctx, outcomes, manifest, tmp_path):
    expected = _in_memory(ctx, outcomes)
    dataset = ctx.out / "dataset"
    # the same files, the same rows in the same order, the same schema
    assert sorted(p.name for p in dataset.iterdir()) == sorted(expected["files"])
    for name, rows in expected["files"].items():
        table = pq.read_table(dataset / name)
        assert table.schema.equals(tables.arrow_schema(InstructionRecord), check_metadata=False)
        assert table.to_pylist() == rows, name
    assert manifest["files"] == {split: [f"dataset/{n}" for n in sorted(expected["files"]) if n.startswith(split)]
                                 for split in write.SPLITS if any(n.startswith(split) for n in expected["files"])}
    # the manifest's counts
    assert {k: manifest[k] for k in expected["summary"]} == expected["summary"]
    assert manifest["consistency"]["flagged_records"] == expected["flagged"]
    assert manifest["consistency"]["flags"] == expected["flags"]
    assert manifest["detector_domain"] == expected["domain"]
    assert list(manifest["detector_domain"]["disc_source"].get("synthetic", {})) == \
        list(expected["domain"]["disc_source"].get("synthetic", {}))  # same order too
    # the benchmark
    questions = mcq.read_benchmark(ctx.out / "benchmark" / "test.parquet")
    assert questions == expected["questions"]
    assert manifest["benchmark"]["questions"] == len(questions)
    # the card, word for word, as the in-memory card writer makes it from all rows at once
    about = {k: manifest[k] for k in PROVENANCE_KEYS}
    reference = write_card(tmp_path / "reference", expected["records"], expected["regions"],
                           {**about, "detector_domain": expected["domain"],
                            "patient_pseudonyms": manifest["labels"]["patient_pseudonyms"]})
    assert (ctx.out / "card" / "README.md").read_text() == reference.read_text()
    card = (ctx.out / "card" / "README.md").read_text()
    summary = expected["summary"]
    assert f"{summary['records']} instruction records from {summary['images']} images" in card
    return expected


def test_the_streamed_end_of_a_run_writes_what_the_in_memory_one_did(built, tmp_path, monkeypatch):
    ctx, plan, outcomes = built
    monkeypatch.setattr(write, "PARTITION_ROWS", 40)  # several sort partitions, files split mid-partition
    manifest = finish_build(ctx, plan, outcomes, time.monotonic())
    expected = _assert_same_as_in_memory(ctx, outcomes, manifest, tmp_path)
    assert len(_files(outcomes, "chain", "records")) >= 6
    assert set(manifest["files"]) == set(write.SPLITS) and len(manifest["files"]["train"]) >= 2
    assert expected["questions"] and manifest["images"] == 19
    assert not list((ctx.out / "builds").glob("*/.sort"))  # the sort's partitions are gone


def test_flagged_records_are_counted_and_dropped_alike(built, tmp_path, monkeypatch):
    ctx, plan, outcomes = built
    # flags on some records of two shards (as a contradicting description would leave them)
    for path in _files(outcomes, "chain", "records")[:2]:
        rows = read_rows(path, InstructionRecord)
        rows = [r.model_copy(update={"flags": [f"lesion_mismatch: {n}", "laterality: x"] if n % 3 == 0 else []})
                for n, r in enumerate(rows)]
        write_rows(path, rows, InstructionRecord)
    monkeypatch.setattr(write, "PARTITION_ROWS", 40)
    dropping = ctx.model_copy(update={"config": ctx.config.model_copy(
        update={"expand": ctx.config.expand.model_copy(update={"drop_flagged": True})})})
    manifest = finish_build(dropping, plan, outcomes, time.monotonic())
    expected = _assert_same_as_in_memory(dropping, outcomes, manifest, tmp_path)
    assert manifest["consistency"]["flagged_records"] == expected["flagged"] > 0
    assert manifest["consistency"]["dropped_records"] == expected["flagged"]
    assert manifest["consistency"]["flags"] == {"laterality": expected["flagged"], "lesion_mismatch": expected["flagged"]}


def test_the_end_of_a_run_reads_a_shard_at_a_time(built, monkeypatch):
    """Every read of the end of a run is one shard's file (or one sort partition), never the
    whole dataset: a counting reader around the table readers it uses."""
    ctx, plan, outcomes = built
    monkeypatch.setattr(write, "PARTITION_ROWS", 40)
    reads: list[tuple[str, int]] = []
    for name in ("read_table", "read_ipc"):
        real = getattr(tables, name)

        def counted(path, *args, _real=real, **kwargs):
            assert isinstance(path, (str, Path)), "one file per read"
            table = _real(path, *args, **kwargs)
            reads.append((Path(path).name, table.num_rows))
            return table

        monkeypatch.setattr(tables, name, counted)
    for module in (tables, runner):
        monkeypatch.setattr(module, "read_rows", lambda *a, **k: pytest.fail("rows read whole at the end of a run"))
    manifest = finish_build(ctx, plan, outcomes, time.monotonic())
    chain = {p.name: pq.read_metadata(p).num_rows for p in _files(outcomes, "chain", "records")}
    per_file = Counter(name for name, _ in reads)
    assert all(per_file[name] == 1 for name in chain)  # each shard's records once
    assert all(per_file[p.name] == 2 for p in _files(outcomes, "ingest", "images"))  # keys, then held-out rows
    partitions = [rows for name, rows in reads if name.endswith(".arrows")]
    assert len(partitions) >= 3 and sum(partitions) == manifest["records"]
    stage_files = {p.name: pq.read_metadata(p).num_rows for o in outcomes for p in map(Path, o.completion.files.values())}
    assert all(rows == stage_files[name] for name, rows in reads if not name.endswith(".arrows"))  # whole shards
    assert max(rows for _, rows in reads) < manifest["records"] / 2


# ------------------------------------------------------------------ the pieces

def _record(sha: str, task: str, split: str, n: int) -> InstructionRecord:
    from fundus_engine.models import Provenance, Turn

    return InstructionRecord(
        record_id=f"{sha[:6]}-{task}-{n:03d}", sha256=sha, image_path=f"/img/{sha[:8]}.jpg",
        source_image_path=f"/img/{sha[:8]}.jpg", task=task, split=split, template_id="t", template_version="1",
        conversations=[Turn(**{"from": "human", "value": "<image>\nq"}), Turn(**{"from": "gpt", "value": f"a{n}"})],
        provenance=Provenance(backend="offline", model="m", prompt_id="p", prompt_version="1", prompt_sha256="0" * 64,
                              engine_version="0"))


def test_dataset_writer_sorts_across_pieces_and_partitions(tmp_path, monkeypatch):
    rng = random.Random(5)
    records = [_record(f"{rng.getrandbits(256):064x}", task, rng.choice(write.SPLITS), n)
               for n in range(120) for task in rng.sample(["counting", "multi_turn", "disease_diagnosis"], 2)]
    records.append(records[0].model_copy(update={"split": None}))  # no split: written nowhere, as before
    expected = {}
    for split in write.SPLITS:
        rows = sorted((r for r in records if r.split == split), key=lambda r: (r.sha256, r.task, r.record_id))
        expected[split] = [[r.model_dump(by_alias=True) for r in rows[i:i + 100]] for i in range(0, len(rows), 100)]
    monkeypatch.setattr(write, "PARTITION_ROWS", 16)
    writer = write.DatasetWriter(tmp_path, WriteConfig(rows_per_file=100), expected_rows=len(records))
    assert writer.partitions == 16
    rng.shuffle(records)
    for start in range(0, len(records), 37):  # shards arrive in any order, each unsorted
        writer.add(tables.table_of(records[start:start + 37], InstructionRecord))
    files = writer.close()
    assert files == {split: [f"dataset/{split}-{n:05d}.parquet" for n in range(len(chunks))]
                     for split, chunks in expected.items()}
    for split, chunks in expected.items():
        for path, rows in zip(files[split], chunks):
            assert pq.read_table(tmp_path / path).to_pylist() == rows
    assert not (tmp_path / ".sort").exists()
    assert write_dataset(records, tmp_path / "at-once", WriteConfig(rows_per_file=100)) == files


def test_splits_from_image_keys_equal_splits_from_whole_rows(built):
    ctx, _, outcomes = built
    paths = _files(outcomes, "ingest", "images")
    keys = [k for p in paths for k in write.read_image_keys(p)]
    rows = read_rows(paths, ImageRecord)
    assert [k.sha256 for k in keys] == [r.sha256 for r in rows]
    assert write.split_images(keys, ctx.config.write) == write.split_images(rows, ctx.config.write)
    # the near-duplicate copy shares its original's split; both eyes of a patient share one
    split = write.split_images(keys, ctx.config.write)
    by_path = {r.relpath: r for r in rows}
    copy = by_path["copies/smaller.jpg"]
    original = next(r for r in rows if r.relpath.startswith("images/") and r.phash and r is not copy
                    and (int(r.phash, 16) ^ int(copy.phash, 16)).bit_count() <= ctx.config.write.near_duplicate_bits)
    assert split[copy.sha256] == split[original.sha256]
    for patient in {r.patient_id for r in rows if r.patient_id}:
        assert len({split[r.sha256] for r in rows if r.patient_id == patient}) == 1


def test_near_duplicate_pairs_band_by_band_equal_all_pairs():
    rng = random.Random(3)
    hashes = {f"i{n}": f"{rng.getrandbits(64):016x}" for n in range(300)}
    for n in range(0, 300, 7):  # near copies, a few bits off
        hashes[f"c{n}"] = f"{int(hashes[f'i{n}'], 16) ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)):016x}"
    brute = sorted((a, b) if a < b else (b, a) for i, a in enumerate(hashes) for b in list(hashes)[i + 1:]
                   if (int(hashes[a], 16) ^ int(hashes[b], 16)).bit_count() <= 6)
    assert write.near_duplicate_pairs(hashes, 6) == brute and len(brute) >= 43


def test_card_box_figures_are_counted_in_fixed_size_histograms():
    from fundus_engine.card import BoxStats

    rng = random.Random(9)
    boxes = BoxStats()
    for n in range(5000):
        x, y = rng.randrange(900), rng.randrange(900)
        boxes.add_rows([("haemorrhage", "model", rng.uniform(0.05, 0.6), [x, y, x + 40, y + 30])])
    assert boxes.per_class["haemorrhage"] == 5000 and boxes.sources["haemorrhage", "model"] == 5000
    assert sum(boxes.sizes["haemorrhage"].values()) == 5000 and len(boxes.sizes["haemorrhage"]) <= 56
    assert boxes.centres["haemorrhage"].shape == (200, 200) and boxes.centres["haemorrhage"].sum() == 5000
    lo, hi = boxes.size_range["haemorrhage"]
    assert 0.05 <= lo < 0.06 and 0.59 < hi <= 0.6

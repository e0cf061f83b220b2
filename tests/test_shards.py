"""Shard membership stays put as photographs are added and removed."""
from __future__ import annotations

import hashlib
import shutil

import pytest

from flows.build_fundusgen import build_fundusgen
from fundus_engine.config import BuildConfig
from fundus_engine.photo_files import SourceFile
from fundus_engine.shards import assign_shards
from fundus_engine.synth import generate


def _sources(names) -> list[SourceFile]:
    return [SourceFile(n, hashlib.sha256(n.encode()).hexdigest()) for n in names]


def _assignment(shards) -> dict[str, int]:
    return {s.sha256: n for n, members in shards.items() for s in members}


def _changed(before, after) -> set[int]:
    return {n for n in set(before) | set(after) if before.get(n) != after.get(n)}


def test_adding_or_removing_one_photograph_of_a_thousand_changes_one_shard():
    images = _sources(f"img_{i:04d}.jpg" for i in range(1000))
    first = assign_shards(images, {}, 64)
    assert [len(m) for m in first.values()] == [64] * 15 + [40]
    early = _sources(["aaa_sorts_first.jpg"])  # would shift every shard of a sorted slicing
    added = assign_shards(images + early, _assignment(first), 64)
    assert _changed(first, added) == {15} and early[0] in added[15]
    removed = assign_shards([s for s in images if s.relpath != "img_0100.jpg"], _assignment(first), 64)
    assert _changed(first, removed) == {1}
    many = assign_shards(images + _sources(f"new_{i:03d}.jpg" for i in range(100)), _assignment(first), 64)
    assert _changed(first, many) == {15, 16, 17} and [len(many[n]) for n in (15, 16, 17)] == [64, 64, 12]


@pytest.mark.usefixtures("prefect_local")
def test_a_build_recomputes_only_the_shard_a_new_photograph_joins(tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    generate(source, 9, seed=21, size=256, full_labels=True)
    config = BuildConfig(shard_size=4)
    first = build_fundusgen(str(source), str(out), config)
    assert [first["stages"]["ingest"][k] for k in ("shards", "computed", "cached")] == [3, 3, 0]
    extra = tmp_path / "extra"
    generate(extra, 1, seed=22, size=256)
    shutil.copy(next((extra / "images").glob("*.jpg")), source / "images" / "a_first_by_name.jpg")
    added = build_fundusgen(str(source), str(out), config)
    assert {stage: (s["computed"], s["cached"]) for stage, s in added["stages"].items()} == {
        stage: (1, 2) for stage in ("ingest", "detect", "crop", "expand", "chain")}
    assert added["images"] == 10

"""The pixel handoff (`fundus_engine.handoff`): a photograph decoded once per shard-stage chain where
it can be (ingest's full-scale decode goes to detect, detect's to crop), with the very same stage
tables and crop files as a build that decodes in every stage."""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_engine import handoff as handoff_module
from fundus_engine.config import BuildConfig, RunnerConfig
from fundus_engine.handoff import PixelHandoff, for_runner
from fundus_engine.models import Anatomy, Detection, ImageRecord, InstructionRecord, Region
from fundus_engine.runner import RunContext, finish_build, plan_build
from fundus_engine.synth import generate
from fundus_engine.tables import read_rows
from in_memory import run_local

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real_fundus" / "images"
TABLES = {("ingest", "images"): ImageRecord, ("detect", "detections"): Detection, ("crop", "anatomy"): Anatomy,
          ("crop", "regions"): Region, ("chain", "records"): InstructionRecord}


def test_kept_pixels_are_taken_once_and_never_past_the_bound():
    a, b = np.zeros((10, 10, 3), np.uint8), np.ones((10, 10, 3), np.uint8)
    handoff = PixelHandoff(max_bytes=a.nbytes + b.nbytes)
    assert handoff.keep("a.jpg", "sha-a", a) and handoff.keep("b.jpg", "sha-b", b)
    assert not handoff.keep("c.jpg", "sha-c", a.copy())  # full: the newest waits longest, so it is not kept
    assert handoff.take("a.jpg", "sha-b") is None  # the same file with other content is another photograph
    assert handoff.take("a.jpg", "sha-a") is a and handoff.take("a.jpg", "sha-a") is None
    assert handoff.held_bytes == b.nbytes and handoff.keep("c.jpg", "sha-c", a.copy())
    handoff.clear()
    assert handoff.held_bytes == 0 and handoff.take("b.jpg", "sha-b") is None


def test_only_the_thread_runner_hands_pixels_on():
    """Dask and Ray may run a shard's next stage in another process: kept pixels would only hold memory."""
    assert for_runner(RunnerConfig()) is handoff_module.PIXELS
    assert for_runner(RunnerConfig(kind="dask")) is None and for_runner(RunnerConfig(kind="ray")) is None


class DecodeCount:
    """cv2.imdecode calls while it is installed, full scale and reduced (IMREAD_REDUCED_* flags)."""

    def __init__(self):
        self.full = self.reduced = 0

    @contextlib.contextmanager
    def installed(self):
        original = cv2.imdecode

        def counted(data, flags):
            if flags & 0x70:
                self.reduced += 1
            else:
                self.full += 1
            return original(data, flags)

        cv2.imdecode = counted
        try:
            yield self
        finally:
            cv2.imdecode = original


def _build(inp: Path, out: Path, config: BuildConfig) -> dict:
    """A build by the library's local loop; its stage tables (the output folder named OUT) and the
    SHA-256 of every crop and marked copy."""
    ctx = RunContext.create(inp, out, config, run_id="handoff")
    plan = plan_build(ctx)
    outcomes = run_local(ctx, plan)
    assert all(o.completion for o in outcomes), [o.failure for o in outcomes if not o.completion]
    assert handoff_module.PIXELS.held_bytes == 0  # crop took every photograph kept for it
    finish_build(ctx, plan, outcomes, time.monotonic())
    found = {}
    for (stage, table), model in TABLES.items():
        rows = [r.model_dump(mode="json") for f in sorted((out / "stages" / stage).glob(f"*.{table}.parquet"))
                for r in read_rows(f, model)]
        found[table] = json.loads(json.dumps(rows).replace(str(out), "OUT"))
    found["files"] = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted((out / "crops").rglob("*.jpg"))}
    return found


def _compare(inp: Path, tmp_path: Path, monkeypatch, config: BuildConfig, room: int = 4 << 30
             ) -> tuple[DecodeCount, DecodeCount]:
    """Builds with the handoff (`room` bytes of it) and decoding in every stage: the same tables
    and files, and how many decodes each made."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(handoff_module.PIXELS, "max_bytes", room)
    with DecodeCount().installed() as handed:
        with_handoff = _build(inp, tmp_path / "handoff", config)
    monkeypatch.setattr(handoff_module, "for_runner", lambda runner: None)
    with DecodeCount().installed() as each_stage:
        without = _build(inp, tmp_path / "each-stage", config)
    assert len(with_handoff["records"]) > 50 and len(with_handoff["files"]) > 20
    for table in (*(t for _, t in TABLES), "files"):
        assert with_handoff[table] == without[table], table
    return handed, each_stage


@pytest.mark.parametrize("room", ["a shard", "two photographs"])
def test_a_synthetic_build_decodes_each_photograph_once_and_writes_what_decoding_in_each_stage_writes(
        tmp_path, monkeypatch, room):
    """With room for a shard every photograph is decoded once; with room for two, the rest are
    decoded where the handoff was full, and the build writes the same."""
    generate(tmp_path / "in", 12, seed=5)
    photograph = cv2.imread(str(next((tmp_path / "in").rglob("*.jpg")))).nbytes  # all 512 x 512
    handed, each_stage = _compare(tmp_path / "in", tmp_path, monkeypatch, BuildConfig(shard_size=5),
                                  room=5 * photograph if room == "a shard" else 2 * photograph)
    assert each_stage.reduced == handed.reduced == 0 and each_stage.full == 3 * 12  # ingest, detect and crop
    if room == "a shard":
        assert handed.full == 12
    else:  # on each of the 3 shards (5, 5 and 2 photographs) two handed to detect and two to crop
        assert handed.full == 3 * 12 - 3 * (2 + 2)


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL}: the real photographs are not here")
def test_the_real_photographs_are_decoded_once_at_full_scale_with_the_same_stage_tables_and_crops(
        tmp_path, monkeypatch):
    """Ingest measures a large JPEG on a reduced decode, so detect decodes that one at full scale;
    every other photograph is decoded once, by ingest."""
    handed, each_stage = _compare(REAL, tmp_path, monkeypatch, BuildConfig())
    photographs = 69
    assert handed.reduced >= 20 and handed.full == photographs
    assert (each_stage.full, each_stage.reduced) == (3 * photographs - handed.reduced, handed.reduced)

"""The stage protocol and the five shard stages of a build.

Each stage declares its name, the tables it reads (written by the stages before it), the tables
it writes (row models) and what its result depends on besides its code and its input (config
fields, prompt templates, detector weights); `run` turns one shard's input tables into a
`StageResult`. The runner (`fundus_engine.runner`) keys, caches, records and schedules them; any
executor (a local loop, Prefect's task runners) can drive it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pyarrow.parquet as pq

from fundus_engine import chain, crop, detect, dicom, expand, handoff, ingest
from fundus_engine.models import (Anatomy, Detection, Expansion, ImageRecord, InstructionRecord, Region, Reject,
                                  Row)

if TYPE_CHECKING:
    from fundus_engine.runner import RunContext, Shard


@dataclass
class StageResult:
    tables: dict[str, list]
    rejects: list[Reject] = field(default_factory=list)
    usage: dict = field(default_factory=dict)  # model calls, tokens, cost
    complete: bool = True  # False: some model requests failed or were not sent; the next run retries
    ran_on: dict = field(default_factory=dict)  # where it ran, where that shapes the rows (detect: device, backend)


class Stage(Protocol):
    name: str
    needs: tuple[str, ...]  # tables read
    writes: dict[str, type[Row]]  # tables written, with their row models

    def depends_on(self, ctx: RunContext) -> list:
        """What the result depends on besides the stage's code and input (part of its key)."""

    def outputs_present(self, files: dict[str, str]) -> bool:
        """Outputs kept outside its tables are still there (a reused result must be whole)."""

    def run(self, ctx: RunContext, shard: Shard, inputs: dict[str, list]) -> StageResult: ...


class _Stage:
    needs: tuple[str, ...] = ()

    def outputs_present(self, files: dict[str, str]) -> bool:
        return True


class Ingest(_Stage):
    name = "ingest"
    writes = {"images": ImageRecord}

    def depends_on(self, ctx: RunContext) -> list:
        # the folders are part of it because rows hold absolute paths to images and crops; the key's
        # variable is not: the pseudonyms it gives are in the shard's labels, which the key holds
        return [str(ctx.input_dir), str(ctx.out), ctx.config.ingest.model_dump(exclude={"patient_key_env"})]

    def outputs_present(self, files: dict[str, str]) -> bool:
        """A DICOM photograph's PNG rendition (the file its row names) lives outside the table:
        deleted, ingest re-runs. (Any other row names its source photograph, which the plan found.)"""
        return all(Path(path).exists() for path in pq.read_table(files["images"], columns=["path"])["path"].to_pylist())

    def run(self, ctx: RunContext, shard: Shard, inputs: dict[str, list]) -> StageResult:
        records, rejects = ingest.ingest(ctx.input_dir, shard.sources, shard.labels, ctx.config.ingest,
                                         renditions=ctx.out / dicom.RENDITIONS,
                                         handoff=handoff.for_runner(ctx.config.runner))
        return StageResult({"images": records}, rejects)


class Detect(_Stage):
    name = "detect"
    needs = ("images",)
    writes = {"detections": Detection}

    def depends_on(self, ctx: RunContext) -> list:
        return [ctx.config.detect.model_dump(exclude={"weights", "batch", "backend", "device"}),  # batch: speed only
                detect.cache_identity(ctx.config.detect),  # the resolved device and backend: auto differs by machine
                ctx.weights_sha256, ctx.evidence.model_dump()]

    def run(self, ctx: RunContext, shard: Shard, inputs: dict[str, list]) -> StageResult:
        detections, rejects = detect.detect(inputs["images"], ctx.config.detect, handoff.for_runner(ctx.config.runner))
        return StageResult({"detections": detections}, rejects, ran_on=detect.cache_identity(ctx.config.detect))


class Crop(_Stage):
    name = "crop"
    needs = ("images", "detections")
    writes = {"anatomy": Anatomy, "regions": Region}

    def depends_on(self, ctx: RunContext) -> list:
        return [ctx.config.crop.model_dump(), ctx.evidence.model_dump()]

    def outputs_present(self, files: dict[str, str]) -> bool:
        """The crop images live outside the stage's tables: a deleted crops/ folder re-runs it."""
        table = pq.read_table(files["regions"], columns=["crop_path", "marked_path"])
        return all(Path(p).exists() for column in table.columns for p in column.to_pylist() if p)

    def run(self, ctx: RunContext, shard: Shard, inputs: dict[str, list]) -> StageResult:
        anatomies, regions, rejects = crop.crop(inputs["images"], inputs["detections"], ctx.out / "crops",
                                                ctx.config.crop, ctx.evidence, handoff.for_runner(ctx.config.runner))
        return StageResult({"anatomy": anatomies, "regions": regions}, rejects)


class Expand(_Stage):
    name = "expand"
    needs = ("images", "anatomy", "regions")
    writes = {"expansions": Expansion}

    def depends_on(self, ctx: RunContext) -> list:
        return [ctx.config.expand.result_relevant(), ctx.prompt_fingerprints["expand"], ctx.evidence.model_dump()]

    def run(self, ctx: RunContext, shard: Shard, inputs: dict[str, list]) -> StageResult:
        config = ctx.config.expand
        if ctx.no_cache:
            config = config.model_copy(update={"openai": config.openai.model_copy(update={"cache": False})})
        expander = expand.make_expander(config, ctx.config.prompts_dir, ctx.out, run_id=ctx.run_id,
                                        evidence=ctx.evidence)
        result = expand.expand(expander, inputs["images"], inputs["anatomy"], inputs["regions"])
        return StageResult({"expansions": result.expansions}, result.rejects, result.usage, result.complete)


class Chain(_Stage):
    name = "chain"
    needs = ("images", "anatomy", "regions", "expansions")
    writes = {"records": InstructionRecord}

    def depends_on(self, ctx: RunContext) -> list:
        return [ctx.config.chain.model_dump(), ctx.prompt_fingerprints["chain"]]

    def run(self, ctx: RunContext, shard: Shard, inputs: dict[str, list]) -> StageResult:
        records, rejects = chain.chain(inputs["images"], inputs["anatomy"], inputs["regions"], inputs["expansions"],
                                       ctx.config.chain, ctx.config.prompts_dir)
        return StageResult({"records": records}, rejects)


STAGES: tuple[Stage, ...] = (Ingest(), Detect(), Crop(), Expand(), Chain())
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
WRITTEN_BY: dict[str, str] = {table: s.name for s in STAGES for table in s.writes}

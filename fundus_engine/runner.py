"""Runs a build's stages shard by shard, with or without Prefect.

- `RunContext`: everything run-wide a stage needs (folders, config, run id, detector evidence,
  prompt fingerprints), explicit and serialisable, so another process can take part.
- `plan_build`: the labels, the photographs and their content-stable shards.
- `run_shard_stage`: one stage on one shard, keyed by content (the upstream key, the stage's code
  closure and what it `depends_on`). A completion record, written last by atomic rename, is the
  source of truth for resume: a shard-stage with a whole record and files is reused, anything
  else (killed mid-way, failed, model requests unanswered) runs again.
- `finish_build`: the end of the run (splits, dataset, card, benchmark, manifest) published in
  one step. What runs the shard-stages in between is the caller's: the Prefect flow
  (`flows/scheduling.py`), or a plain loop (tests/in_memory.py `run_local`).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

import fundus_engine
from fundus_engine import chain as chain_stage, mcq, detect as detect_stage, expand as expand_stage
from fundus_engine import write as write_stage
from fundus_engine import handoff
from fundus_engine.image_paths import content_paths, published_paths, renamed_paths
from fundus_engine import tables
from fundus_engine.layout_labels import layout_items, mask_folders, with_layout_boxes
from fundus_engine.labels import (ambiguous_keys, identifier_in_path, labels_for, load_labels, patient_key,
                                  patient_key_id)
from fundus_engine.photo_files import scan
from fundus_engine.card import BoxStats, render_card
from fundus_engine.config import BuildConfig
from fundus_engine.evidence import DetectorEvidence, DomainReport
from fundus_engine.redaction import redact_url
from fundus_engine.export import to_vlmevalkit_tsv
from fundus_engine.photo_files import SourceFile
from fundus_engine.models import Anatomy, ImageRecord, InstructionRecord, Region, Reject
from fundus_engine.prompts import fingerprint
from fundus_engine.publish import new_build_dir, publish
from fundus_engine.shards import assign_shards, load_assignment, save_assignment
from fundus_engine.stages import BY_NAME, STAGES, WRITTEN_BY, Stage
from fundus_engine.tables import read_rows, write_rows

STAGE_NAMES = tuple(s.name for s in STAGES)


class RunContext(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    input_dir: Path
    out: Path
    config: BuildConfig
    run_id: str
    no_cache: bool = False
    weights: str
    weights_sha256: str
    evidence: DetectorEvidence
    prompt_fingerprints: dict[str, str]  # stage -> hash of the templates it renders
    prompts: list[dict]  # id, version, sha256 of every template, for the manifest
    expand_backend: str
    code_versions: dict[str, str]  # stage -> hash of its module's import closure (read once per run)

    @classmethod
    def create(cls, input_dir: Path, out: Path, config: BuildConfig, run_id: str, no_cache: bool = False
               ) -> "RunContext":
        weights = detect_stage.weights_path(config.detect)
        # The expander is built once here for its prompts (its requests are sent by the stage).
        expander = expand_stage.make_expander(config.expand, config.prompts_dir, out, run_id=run_id)
        chain_prompts = chain_stage.all_templates(config.prompts_dir, config.chain.languages)
        return cls(input_dir=Path(input_dir).resolve(), out=Path(out).resolve(), config=config, run_id=run_id,
                   no_cache=no_cache, weights=str(weights), weights_sha256=detect_stage.weights_sha256(weights),
                   # per kind of photograph: what the detector may say (present, absent)
                   evidence=DetectorEvidence.of(weights, config.expand.negative_min_map50,
                                                labels_stated=config.detect.ground_truth == "prefer"),
                   prompt_fingerprints={"expand": fingerprint(expander.prompts), "chain": fingerprint(chain_prompts)},
                   prompts=[{"id": p.id, "version": p.version, "sha256": p.sha256}
                            for p in [*expander.prompts, *chain_prompts]],
                   expand_backend=expander.name, code_versions={s.name: code_version(s.name) for s in STAGES})


class Shard(BaseModel):
    number: int
    sources: list[SourceFile]
    labels: dict  # relpath -> label fields, for the images that have labels


class Plan(BaseModel):
    shards: list[Shard]
    rejects: list[Reject]
    label_entries: int
    labelled_images: int
    # how patient identifiers were pseudonymised: "keyed <key id>", "unkeyed", or None (no patient ids)
    patient_pseudonyms: str | None = None
    identifiers_in_paths: int = 0  # photographs whose path holds their patient's identifier


class Completion(BaseModel):
    """One shard-stage's completion record: where its rows are, not the rows."""

    stage: str
    shard: int
    key: str
    files: dict[str, str]
    rows: int
    rejects: list[Reject] = []
    usage: dict = {}  # model calls, tokens and cost spent computing it
    complete: bool = True  # False: some model requests failed or were not sent (or upstream was not whole)
    seconds: float | None = None
    ran_on: dict = {}  # where it ran, where that shapes the rows (detect: resolved device and backend)
    reused: bool = False  # this run found it whole and did not compute it (not stored in the record)


# ------------------------------------------------------------------------------------- keys

def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def code_version(module: str) -> str:
    """The source of a stage's module and of every package module it imports, directly or not:
    editing any of them re-runs the stage (a hand-kept list goes stale)."""
    root = Path(fundus_engine.__file__).parent
    return digest(*[(root / f"{name}.py").read_text() for name in sorted(import_closure(module, root))])


def import_closure(module: str, root: Path) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = root / f"{name}.py"
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fundus_engine"):
                parts = node.module.split(".")[1:]
                todo += [parts[0]] if parts else [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("fundus_engine.")]
    return seen


def stage_key(stage: Stage, ctx: RunContext, shard: Shard, upstream_key: str | None) -> str:
    """Chained on the key of the stage before; the first stage on the shard's files and labels."""
    base = upstream_key or digest([(s.relpath, s.sha256) for s in shard.sources], shard.labels)
    return digest(base, stage.name, ctx.code_versions[stage.name], stage.depends_on(ctx))


# ------------------------------------------------------------------------------- running

def _record_path(out: Path, stage: str, shard: int, key: str) -> Path:
    return out / "stages" / stage / f"{shard:05d}-{key[:16]}.done.json"


def _reusable(stage: Stage, ctx: RunContext, path: Path) -> Completion | None:
    try:
        done = Completion.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None
    if not done.complete or not all(Path(f).exists() for f in done.files.values()) or not stage.outputs_present(done.files):
        return None
    return done.model_copy(update={"reused": True})


def run_shard_stage(stage: Stage | str, ctx: RunContext, shard: Shard, upstream: dict[str, Completion]
                    ) -> Completion:
    """One stage on one shard: reused when its completion record is whole and every stage it reads
    from was reused too; otherwise computed, its tables written, and its record written last."""
    stage = BY_NAME[stage] if isinstance(stage, str) else stage
    previous = upstream.get(STAGE_NAMES[STAGE_NAMES.index(stage.name) - 1]) if stage.name != STAGE_NAMES[0] else None
    key = stage_key(stage, ctx, shard, previous.key if previous else None)
    path = _record_path(ctx.out, stage.name, shard.number, key)
    if not ctx.no_cache and all(u.reused for u in upstream.values()) and (done := _reusable(stage, ctx, path)):
        return done
    started = time.monotonic()
    inputs = {table: read_rows(Path(upstream[WRITTEN_BY[table]].files[table]),
                               BY_NAME[WRITTEN_BY[table]].writes[table]) for table in stage.needs}
    result = stage.run(ctx, shard, inputs)
    files = {name: str(path.with_name(f"{shard.number:05d}-{key[:16]}.{name}.parquet")) for name in stage.writes}
    for name, rows in result.tables.items():
        write_rows(Path(files[name]), rows, stage.writes[name])
    done = Completion(stage=stage.name, shard=shard.number, key=key, files=files,
                      rows=len(next(iter(result.tables.values()))), rejects=result.rejects, usage=result.usage,
                      complete=result.complete and all(u.complete for u in upstream.values()),
                      seconds=round(time.monotonic() - started, 3), ran_on=result.ran_on)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(done.model_dump_json(exclude={"reused"}))
    os.replace(tmp, path)  # last: a shard-stage killed before this point runs again
    return done


def plan_build(ctx: RunContext) -> Plan:
    """Labels (the manifest's, and boxes from `ingest.label_layouts`), photographs and their shards
    (membership kept from build to build)."""
    labels, rejects = load_labels(ctx.input_dir, ctx.config.ingest)
    masks = mask_folders(ctx.config.ingest.label_layouts, ctx.input_dir)
    sources, scan_rejects = scan(ctx.input_dir, exclude=[ctx.out, *masks],
                                 labelled=lambda rel: labels_for(rel, labels) is not None)
    rejects += scan_rejects
    ambiguous = ambiguous_keys([s.relpath for s in sources], labels)
    rejects += [Reject(stage="ingest", item=f"labels entry {key}",
                       reason="names several images in the input folder; use the relative path")
                for key in sorted(ambiguous)]
    matched = {s.relpath: labels_for(s.relpath, labels, ambiguous) for s in sources}
    from_layouts, layout_rejects = layout_items(ctx.config.ingest.label_layouts, ctx.input_dir, sources)
    rejects += layout_rejects
    for relpath, items in from_layouts.items():
        matched[relpath] = with_layout_boxes(matched[relpath], items)
    secret = patient_key(ctx.config.ingest)
    size = ctx.config.shard_size
    shards = assign_shards(sources, load_assignment(ctx.out, size), size)
    save_assignment(ctx.out, size, shards)
    return Plan(shards=[Shard(number=n, sources=batch, labels={s.relpath: matched[s.relpath] for s in batch
                                                                if matched[s.relpath]})
                        for n, batch in shards.items()],
                rejects=rejects, label_entries=len(labels), labelled_images=sum(1 for v in matched.values() if v),
                patient_pseudonyms=_pseudonyms(matched.values(), secret),
                identifiers_in_paths=sum(1 for rel, entry in matched.items() if entry and "patient_id" in entry
                                         and identifier_in_path(str(ctx.input_dir / rel), entry["patient_id"], secret)))


def _pseudonyms(entries, secret: bytes | None) -> str | None:
    """How the patients of the photographs being built are named; None when no entry names one."""
    if not any(entry and "patient_id" in entry for entry in entries):
        return None
    return f"keyed {patient_key_id(secret)}" if secret else "unkeyed"


class StageOutcome(BaseModel):
    """How one shard-stage ended in this run: its completion record, or why there is none."""

    stage: str
    shard: int
    completion: Completion | None = None
    failure: str | None = None  # the error of a failed shard-stage
    state: str = "completed"  # or failed, cancelled, not run


# ------------------------------------------------------------------------- the end of a run

def finish_build(ctx: RunContext, plan: Plan, outcomes: list[StageOutcome], started: float) -> dict:
    """Splits, dataset, rejects, card, benchmark and manifest written into a new build folder and
    published in one step; stage files no shard uses any more are dropped. Returns the manifest.

    Streams, a shard at a time, so memory does not grow with the dataset: splits from the image
    keys alone (hash, patient, perceptual hash: `write.read_image_keys`), then each chain shard's
    records given their split and passed to the dataset writer (an external sort, `write.DatasetWriter`)
    and the counters of the manifest and card (`write.RecordStats`), then each crop shard's rows
    counted for the card's box figures and the detector-domain report, keeping only the held-out
    (test split) images' rows, which are all the benchmark reads."""
    out, config = ctx.out, ctx.config
    handoff.PIXELS.clear()  # what a stage that failed left for the next
    build_dir = new_build_dir(out, f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{ctx.run_id[:8]}")
    done = {(o.stage, o.shard): o.completion for o in outcomes if o.completion}
    rejects = list(plan.rejects)
    for o in outcomes:
        if o.completion:
            rejects += o.completion.rejects
        elif o.state == "failed":
            rejects.append(Reject(stage=o.stage, item=f"shard {o.shard:05d}",
                                  reason=f"{o.stage} failed for the whole shard: {o.failure}"))

    def files(stage: str, table: str) -> list[Path]:  # one per shard, in shard order
        return [Path(c.files[table]) for (s, _), c in sorted(done.items()) if s == stage]

    # Splits: patients and near-duplicates grouped across shards, from the image keys alone.
    keys = [k for path in files("ingest", "images") for k in write_stage.read_image_keys(path)]
    split_of = write_stage.split_images(keys, config.write)
    domain_stats = DomainReport(ctx.evidence)
    for k in keys:
        domain_stats.add_image(k.sha256, k.synthetic)
    del keys

    # Where the published outputs say the photographs are: their source paths, or hash-named copies.
    image_paths = published_paths(config.write.image_paths, plan.identifiers_in_paths)
    renamed = content_paths(files("ingest", "images"), out) if image_paths == "content" else {}

    # The dataset, a chain shard at a time.
    stats = write_stage.RecordStats()
    writer = write_stage.DatasetWriter(build_dir, config.write,
                                       expected_rows=sum(c.rows for (s, _), c in done.items() if s == "chain"))
    for path in files("chain", "records"):
        records = write_stage.with_splits(tables.read_table(path, InstructionRecord), split_of)
        if renamed:
            records = renamed_paths(records, renamed)
        stats.add_flags(records.column("flags").to_pylist())
        if config.expand.drop_flagged:
            records = write_stage.unflagged(records)
        stats.add_table(records)
        writer.add(records)
        del records
    dataset_files = writer.close()
    write_stage.write_rejects(rejects, build_dir)

    # Images, anatomy and regions, a shard at a time: counted for the card and the domain report;
    # the held-out images' rows kept for the benchmark (never in train or val).
    used, held_out = pa.array(sorted(stats.images), pa.string()), pa.array(sorted(stats.held_out), pa.string())
    held: dict[str, list] = {"images": [], "anatomy": [], "regions": []}
    boxes = BoxStats()
    for path in files("ingest", "images"):
        held["images"] += _held_rows(tables.read_table(path, ImageRecord), held_out, ImageRecord)
    for path in files("crop", "anatomy"):
        anatomy = tables.read_table(path, Anatomy)
        for row in zip(*(anatomy.column(c).to_pylist() for c in ("sha256", "disc_source", "fovea_source"))):
            domain_stats.add_anatomy(*row)
        held["anatomy"] += _held_rows(anatomy, held_out, Anatomy)
    for path in files("crop", "regions"):
        regions = tables.read_table(path, Region)
        for row in zip(*(regions.column(c).to_pylist() for c in ("sha256", "source", "confidence"))):
            domain_stats.add_region(*row)
        boxes.add_table(regions.filter(pc.is_in(regions.column("sha256"), value_set=used)))
        held["regions"] += _held_rows(regions, held_out, Region)
        del regions
    about = provenance(ctx, [c.ran_on for (s, _), c in sorted(done.items()) if s == "detect"])
    # Where the detector stood on these photographs: said plainly when it was out of its domain.
    domain = domain_stats.report()
    render_card(build_dir, stats, boxes, {**about, "detector_domain": domain,
                                          "patient_pseudonyms": plan.patient_pseudonyms, "image_paths": image_paths,
                                          "identifiers_in_paths": plan.identifiers_in_paths})
    # The multiple-choice benchmark: held-out (test split) images only, never in train or val.
    if renamed:  # the benchmark shows the same photographs the dataset names
        held["images"] = [i.model_copy(update={"path": renamed[i.path]}) for i in held["images"]]
    questions = mcq.build_benchmark(held["images"], held["anatomy"], held["regions"], stats.held_out,
                                    seed=config.chain.seed)
    mcq.write_benchmark(questions, build_dir / "benchmark" / "test.parquet")
    to_vlmevalkit_tsv(questions, build_dir / "benchmark" / "test.tsv", embed_images=True)  # self-contained

    unfinished: dict[str, list[int]] = {}
    for o in outcomes:
        if not (o.completion and o.completion.complete):
            unfinished.setdefault(o.stage, []).append(o.shard)
    computed = [o.completion for o in outcomes if o.completion and not o.completion.reused]
    manifest = {
        **about,
        "model_usage": sum_usage([c.usage for c in computed if c.usage], config),
        "labels": {"entries": plan.label_entries, "matched_images": plan.labelled_images,
                   "patient_pseudonyms": plan.patient_pseudonyms, "identifiers_in_paths": plan.identifiers_in_paths},
        "image_paths": image_paths,
        "stages": {stage: {"shards": sum(o.stage == stage for o in outcomes),
                           "computed": sum(c.stage == stage for c in computed),
                           "cached": sum(o.stage == stage and bool(o.completion and o.completion.reused)
                                         for o in outcomes),
                           # task seconds of the shards computed now (they overlap across workers)
                           "seconds": round(sum(c.seconds or 0 for c in computed if c.stage == stage), 2)}
                   for stage in STAGE_NAMES},
        "wall_seconds": round(time.monotonic() - started, 2),
        # False when a shard-stage failed or left model requests unanswered: the dataset holds
        # what finished, and the next run completes it from the stage files and response cache.
        "complete": not unfinished,
        "incomplete_shards": unfinished,
        "files": dataset_files, **stats.summary(rejects),
        "consistency": {"flagged_records": stats.flagged,
                        "dropped_records": stats.flagged if config.expand.drop_flagged else 0,
                        "flags": dict(sorted(stats.flags.items()))},
        "detector_domain": domain,
        "benchmark": {"questions": len(questions), "images": len({q.sha256 for q in questions}),
                      "per_task": dict(sorted(Counter(q.clinical_task for q in questions).items()))},
    }
    write_stage.write_manifest(build_dir, manifest)  # last inside the build folder
    publish(out, build_dir)  # dataset, manifest, card, benchmark and rejects switch together
    _prune(out, {Path(f).name.split(".")[0] for c in done.values() for f in c.files.values()})
    return manifest


def _held_rows(table: pa.Table, held_out: pa.Array, model: type) -> list:
    """The rows of the held-out images, validated; the rest of the shard is let go."""
    return tables.rows_of(table.filter(pc.is_in(table.column("sha256"), value_set=held_out)), model)


def provenance(ctx: RunContext, detect_ran_on: list[dict]) -> dict:
    """What the build was made with. `detect_ran_on`: each detect shard's resolved device and backend,
    as its worker reported them (a cluster's workers may differ; the flow's process never loads torch)."""
    ran_on = [json.loads(r) for r in sorted({json.dumps(r, sort_keys=True) for r in detect_ran_on if r})]
    return {
        "engine_version": fundus_engine.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input_dir": str(ctx.input_dir),
        "output_dir": str(ctx.out),
        "config": _public(ctx.config),
        "detector": {"weights": ctx.weights, "sha256": ctx.weights_sha256,
                     "runs_on": ran_on[0] if len(ran_on) == 1 else ran_on,
                     "validated_on": ctx.evidence.validated,
                     # per kind of photograph: the classes it places and whose silence means absent
                     "trusted_on": ctx.evidence.trusted},
        "expand_backend": ctx.expand_backend,
        "prompts": ctx.prompts,
    }


def _prune(out: Path, keep: set[str]) -> None:
    """Drop shard files and records of earlier builds that no current shard uses."""
    for stage in STAGE_NAMES:
        for path in (out / "stages" / stage).glob("*.*"):
            if path.name.split(".")[0] not in keep:
                path.unlink()


def _public(config: BuildConfig) -> dict:
    """The config as written to the manifest and card: server URLs without credentials."""
    data = config.model_dump(mode="json")
    data["expand"]["openai"]["base_url"] = redact_url(config.expand.openai.base_url)
    return data


def sum_usage(usage: list[dict], config: BuildConfig) -> dict:
    """Model calls, tokens and estimated cost spent by this run (reused shards cost nothing)."""
    total: Counter = Counter()
    status: Counter = Counter()
    for u in usage:
        total.update({k: v for k, v in u.items() if k != "http_status"})
        status.update(u.get("http_status", {}))
    out = {k: (round(v, 6) if k == "cost_usd" else v) for k, v in total.items()}
    if config.expand.backend == "openai":
        out.update(model=config.expand.openai.model, base_url=redact_url(config.expand.openai.base_url),
                   max_cost_usd=config.expand.openai.max_cost, response_cache=config.expand.openai.cache,
                   http_status=dict(status))
        out["budget_stopped"] = total["not_sent_budget"] > 0
    return out

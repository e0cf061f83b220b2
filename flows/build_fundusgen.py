"""The `build-fundusgen` Prefect flow: ingest -> detect -> crop -> expand -> chain -> write.

Work is done per shard of images. Every shard-stage is a task whose cache key is computed
up front from content: the images' sha256, the stage's config section, the stage's code and
the prompt templates it renders, chained through the upstream stage's key. So an unchanged
re-run recomputes nothing, and an edited prompt re-runs only the stages that render it and
those after them. Each shard-stage writes its rows to a content-addressed Parquet file under
`OUT/stages/<stage>/`; Prefect keeps the cache records under `OUT/.cache/prefect`.

No `from __future__ import annotations` here: a served flow validates its parameters from
the real annotation, and a string "BuildConfig" is left undefined in the runner.
"""

import ast
import hashlib
import json
import os
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext
from prefect.futures import as_completed
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

import fundus_engine
from fundus_engine import benchmark
from fundus_engine import chain as chain_stage
from fundus_engine import crop as crop_stage
from fundus_engine import detect as detect_stage
from fundus_engine import expand as expand_stage
from fundus_engine import ingest as ingest_stage
from fundus_engine import write as write_stage
from fundus_engine.card import write_card
from fundus_engine.config import BuildConfig
from fundus_engine.evidence import DetectorEvidence, domain_report
from fundus_engine.expand_openai import redact_url
from fundus_engine.progress import BuildProgress
from fundus_engine.publish import BuildLock, new_build_dir, publish
from fundus_engine.shards import assign_shards, load_assignment, save_assignment
from fundus_engine.export import to_vlmevalkit_tsv
from fundus_engine.models import (Anatomy, Detection, Expansion, ImageRecord, InstructionRecord, Region, Reject)
from fundus_engine.prompts import fingerprint
from fundus_engine.tables import read_rows, write_rows
from fundus_engine.vocabulary import LESIONS

STAGES = ("ingest", "detect", "crop", "expand", "chain")
# The tables each stage writes per shard, and their row models.
TABLES: dict[str, dict[str, type[BaseModel]]] = {
    "ingest": {"images": ImageRecord},
    "detect": {"detections": Detection},
    "crop": {"anatomy": Anatomy, "regions": Region},
    "expand": {"expansions": Expansion},
    "chain": {"records": InstructionRecord},
}


class ShardOutput(BaseModel):
    """What a shard-stage task returns (and Prefect caches): where its rows are, not the rows."""

    stage: str
    shard: int
    key: str
    files: dict[str, str]
    rows: int
    rejects: list[Reject] = []
    usage: dict = {}  # model calls, tokens and cost spent computing this shard
    complete: bool = True  # False: some model requests failed or were not sent; the next run retries
    seconds: float | None = None  # wall time of the task that computed it


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def code_version(stage: str) -> str:
    """The source of the stage's module and of every package module it imports, directly or
    not: editing any of them re-runs the stage (a hand-kept list goes stale)."""
    root = Path(fundus_engine.__file__).parent
    return digest(*[(root / f"{name}.py").read_text() for name in sorted(_import_closure(stage, root))])


def _import_closure(module: str, root: Path) -> set[str]:
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


def shard_files(out: Path, stage: str, shard: int, key: str) -> dict[str, Path]:
    return {name: out / "stages" / stage / f"{shard:05d}-{key[:16]}.{name}.parquet" for name in TABLES[stage]}


def incomplete_marker(out: Path, stage: str, shard: int, key: str) -> Path:
    return out / "stages" / stage / f"{shard:05d}-{key[:16]}.incomplete"


def _cache_key(context, parameters) -> str:
    return f"{parameters['stage']}-{parameters['key']}"


def _save(out: Path, stage: str, shard: int, key: str, tables: dict[str, list], rejects: list[Reject],
          usage: dict | None = None, complete: bool = True) -> ShardOutput:
    files = shard_files(out, stage, shard, key)
    for name, rows in tables.items():
        write_rows(files[name], rows, TABLES[stage][name])
    marker = incomplete_marker(out, stage, shard, key)
    if complete:
        marker.unlink(missing_ok=True)
    else:
        marker.write_text("\n".join(r.reason for r in rejects))
    main = next(iter(tables.values()))
    run = TaskRunContext.get()
    begun = run.task_run.start_time if run else None
    seconds = round((datetime.now(timezone.utc) - begun).total_seconds(), 3) if begun else None
    return ShardOutput(stage=stage, shard=shard, key=key, files={k: str(v) for k, v in files.items()},
                       rows=len(main), rejects=rejects, usage=usage or {}, complete=complete, seconds=seconds)


def _load(output: ShardOutput, name: str) -> list:
    return read_rows(Path(output.files[name]), TABLES[output.stage][name])


@task(task_run_name="ingest-{shard:05d}", persist_result=True, cache_key_fn=_cache_key)
def ingest_task(stage: str, shard: int, key: str, out: str, input_dir: str,
                sources: list[ingest_stage.SourceFile], labels: dict, config: BuildConfig) -> ShardOutput:
    records, rejects = ingest_stage.ingest(Path(input_dir), sources, labels, config.ingest)
    return _save(Path(out), stage, shard, key, {"images": records}, rejects)


@task(task_run_name="detect-{shard:05d}", persist_result=True, cache_key_fn=_cache_key)
def detect_task(stage: str, shard: int, key: str, out: str, ingested: ShardOutput, config: BuildConfig) -> ShardOutput:
    detections, rejects = detect_stage.detect(_load(ingested, "images"), config.detect)
    return _save(Path(out), stage, shard, key, {"detections": detections}, rejects)


@task(task_run_name="crop-{shard:05d}", persist_result=True, cache_key_fn=_cache_key)
def crop_task(stage: str, shard: int, key: str, out: str, ingested: ShardOutput, detected: ShardOutput,
              config: BuildConfig, evidence: DetectorEvidence) -> ShardOutput:
    anatomies, regions, rejects = crop_stage.crop(_load(ingested, "images"), _load(detected, "detections"),
                                                  Path(out) / "crops", config.crop, evidence)
    return _save(Path(out), stage, shard, key, {"anatomy": anatomies, "regions": regions}, rejects)


@task(task_run_name="expand-{shard:05d}", persist_result=True, cache_key_fn=_cache_key)
def expand_task(stage: str, shard: int, key: str, out: str, ingested: ShardOutput, cropped: ShardOutput,
                config: BuildConfig, evidence: DetectorEvidence) -> ShardOutput:
    expander = expand_stage.make_expander(config.expand, config.prompts_dir, Path(out), run_id=flow_run.get_id(),
                                          evidence=evidence)
    result = expand_stage.expand(expander, _load(ingested, "images"), _load(cropped, "anatomy"),
                                 _load(cropped, "regions"))
    return _save(Path(out), stage, shard, key, {"expansions": result.expansions}, result.rejects, result.usage,
                 result.complete)


@task(task_run_name="chain-{shard:05d}", persist_result=True, cache_key_fn=_cache_key)
def chain_task(stage: str, shard: int, key: str, out: str, ingested: ShardOutput, cropped: ShardOutput,
               expanded: ShardOutput, config: BuildConfig) -> ShardOutput:
    records, rejects = chain_stage.chain(_load(ingested, "images"), _load(cropped, "anatomy"),
                                         _load(cropped, "regions"), _load(expanded, "expansions"),
                                         config.chain, config.write, config.prompts_dir)
    return _save(Path(out), stage, shard, key, {"records": records}, rejects)


def stage_keys(shard_sources: list[ingest_stage.SourceFile], shard_labels: dict, config: BuildConfig,
               expand_prompts: str, chain_prompts: str, weights_sha: str, evidence: DetectorEvidence, inp: Path,
               out: Path
               ) -> dict[str, str]:
    """Every stage's cache key for one shard, each chained on the key before it. The input and
    output folders are part of it because rows hold absolute paths to images and crops."""
    keys = {"ingest": digest("ingest", code_version("ingest"), str(inp), str(out),
                             [(s.relpath, s.sha256) for s in shard_sources],
                             shard_labels, config.ingest.model_dump())}
    keys["detect"] = digest(keys["ingest"], code_version("detect"),
                            config.detect.model_dump(exclude={"weights", "batch"}),  # batch changes speed only
                            weights_sha, evidence.model_dump())
    keys["crop"] = digest(keys["detect"], code_version("crop"), config.crop.model_dump(), evidence.model_dump())
    keys["expand"] = digest(keys["crop"], code_version("expand"),  # its closure holds the openai backend
                            config.expand.result_relevant(), expand_prompts, evidence.model_dump())
    keys["chain"] = digest(keys["expand"], code_version("chain"), config.chain.model_dump(),
                           config.write.model_dump(include={"val_fraction", "test_fraction"}), chain_prompts)
    return keys


@task(task_run_name="write")
def write_task(build_dir: str, ingested: list[ShardOutput], cropped: list[ShardOutput], chained: list[ShardOutput],
               rejects: list[Reject], config: BuildConfig, about: dict) -> dict:
    images = [r for output in ingested for r in _load(output, "images")]
    split_of = write_stage.split_images(images, config.write)  # patients and near-duplicates, across shards
    records = [r.model_copy(update={"split": split_of[r.sha256]})
               for output in chained for r in _load(output, "records")]
    flagged = [r for r in records if r.flags]
    if config.expand.drop_flagged:
        records = [r for r in records if not r.flags]
    out = Path(build_dir)
    files = write_stage.write_dataset(records, out, config.write)
    write_stage.write_rejects(rejects, out)
    regions = [r for output in cropped for r in _load(output, "regions")]
    anatomies = [a for output in cropped for a in _load(output, "anatomy")]
    # Where the detector stood on these photographs: said plainly when it was out of its domain.
    domain = domain_report(images, anatomies, regions, DetectorEvidence(validated=about["detector"]["validated_on"]))
    write_card(out, records, regions, {**about, "detector_domain": domain})
    # The multiple-choice benchmark: held-out (test split) images only, never in train or val.
    held_out = {r.sha256 for r in records if r.split == "test"}
    questions = benchmark.build_benchmark(images, anatomies, regions, held_out, seed=config.chain.seed)
    benchmark.write_benchmark(questions, out / "benchmark" / "test.parquet")
    to_vlmevalkit_tsv(questions, out / "benchmark" / "test.tsv", embed_images=True)  # self-contained
    consistency = {"flagged_records": len(flagged), "dropped_records": len(flagged) if config.expand.drop_flagged else 0,
                   "flags": dict(sorted(Counter(f.split(":")[0] for r in flagged for f in r.flags).items()))}
    return {"files": files, **write_stage.summarise(records, rejects), "consistency": consistency,
            "detector_domain": domain,
            "benchmark": {"questions": len(questions), "images": len({q.sha256 for q in questions}),
                          "per_task": dict(sorted(Counter(q.clinical_task for q in questions).items()))}}


def _follow(futures: dict[str, list], progress: BuildProgress, logger) -> None:
    """Wait for every shard-stage as it finishes, reporting progress (a line per stage at most
    every few seconds, and the progress file the CLI's live display reads)."""
    shards = list(progress.shard_images)  # futures[stage] follow the shards' order
    where = {id(f): (stage, shards[n]) for stage, fs in futures.items() for n, f in enumerate(fs)}
    last_line: dict[str, float] = {}
    for future in as_completed([f for fs in futures.values() for f in fs]):
        stage, shard = where[id(future)]
        state = future.state
        result = future.result(raise_on_failure=False) if state.is_completed() else None
        line = progress.finished(stage, shard, len(result.rejects) if isinstance(result, ShardOutput) else 0,
                                 cached=state.name == "Cached")
        s = progress.stages[stage]
        if s.done == s.total or time.monotonic() - last_line.get(stage, 0) > 5:
            last_line[stage] = time.monotonic()
            logger.info(line)


def _crops_present(regions_file: Path) -> bool:
    """The crop stage's images live outside its Parquet; a deleted crops/ folder re-runs it."""
    table = pq.read_table(regions_file, columns=["crop_path", "marked_path"])
    return all(Path(p).exists() for column in table.columns for p in column.to_pylist() if p)


def _prune(out: Path, keep: set[str]) -> None:
    """Drop shard files of earlier builds that no current shard uses."""
    for stage in STAGES:
        for path in (out / "stages" / stage).glob("*.*"):
            if str(path.with_name(path.name.split(".")[0])) not in keep:
                path.unlink()


def _publish_artifacts(stage_rows: dict[str, list[dict]], summary: dict, out: Path, rejects: list[Reject], seconds: float):
    for stage, rows in stage_rows.items():
        create_table_artifact(key=f"fundusgen-{stage}", table=rows,
                              description=f"{stage}: one row per shard (computed or cached, rows out, rejects)")
    if rejects:
        create_table_artifact(key="fundusgen-rejects", table=[r.model_dump() for r in rejects[:500]],
                              description=f"Rejected items ({len(rejects)} in all; full table in {out}/rejects.parquet)")
    lines = [f"# FundusGen build: {summary['records']} records from {summary['images']} images",
             f"Output: `{out}` in {seconds:.1f} s", "", "| task | records |", "|---|---|"]
    lines += [f"| {task} | {n} |" for task, n in summary["records_per_task"].items()]
    lines += ["", "| split | images | records |", "|---|---|---|"]
    lines += [f"| {s} | {summary['images_per_split'].get(s, 0)} | {summary['records_per_split'].get(s, 0)} |"
              for s in write_stage.SPLITS]
    lines += ["", f"Rejects: {summary['rejects']} {summary['rejects_per_stage']}", "",
              "| stage | shards computed | shards cached | task seconds |", "|---|---|---|---|"]
    lines += [f"| {stage} | {sum(r['status'] == 'computed' for r in rows)} | {sum(r['status'] == 'cached' for r in rows)} "
              f"| {sum(r.get('seconds') or 0 for r in rows):.1f} |" for stage, rows in stage_rows.items()]
    if summary.get("model_usage"):
        lines += ["", "| model usage (this run) | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["model_usage"].items()]
    if not summary["complete"]:
        lines += ["", f"**Incomplete**: shards to finish on the next run: {summary['incomplete_shards']}"]
    domain = summary.get("detector_domain") or {}
    if domain.get("disc_source"):
        lines += ["", f"Optic disc from: {domain['disc_source']}; fovea from: {domain['fovea_source']}"]
    if domain.get("warning"):
        lines += ["", f"**Warning:** {domain['warning']}"]
    if summary.get("consistency", {}).get("flagged_records"):
        lines += ["", f"Consistency flags: {summary['consistency']}"]
    create_markdown_artifact(key="fundusgen-summary", markdown="\n".join(lines), description="FundusGen build summary")


@flow(name="build-fundusgen", task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 2),
      log_prints=True, validate_parameters=True)
def build_fundusgen(input_dir: str, output_dir: str, config: BuildConfig = BuildConfig(), no_cache: bool = False) -> dict:
    """Build a FundusGen-style instruction dataset from a folder of fundus photographs.

    `no_cache` recomputes every stage and sends every model request again (the fresh answers
    still replace the cached ones).
    """
    inp, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    run_id = flow_run.get_id()
    with BuildLock(out, run=str(run_id)) as lock:  # a second build into OUT stops here, naming this one
        if lock.taken_over:
            get_run_logger().warning("took over the lock of a build that ended without releasing it: %s",
                                     lock.taken_over)
        try:
            manifest = _build(inp, out, config, no_cache, run_id)
        finally:  # the run-wide model ledger is closed however the run ends
            if config.expand.backend == "openai":
                from fundus_engine.expand_openai import close_run

                close_run(run_id)
    if not manifest["complete"]:  # finished, not whole: a state of its own, the manifest as its result
        return Completed(name="Incomplete", data=manifest,
                         message=f"incomplete: re-run the same build to finish {manifest['incomplete_shards']}")
    return manifest


def _build(inp: Path, out: Path, config: BuildConfig, no_cache: bool, run_id) -> dict:
    started = time.monotonic()
    logger = get_run_logger()
    storage = out / ".cache" / "prefect"
    # This build's published outputs go to a folder of their own, made visible in one step at the end.
    build_dir = new_build_dir(out, f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{str(run_id)[:8]}")

    labels, rejects = ingest_stage.load_labels(inp, config.ingest)
    sources, scan_rejects = ingest_stage.scan(inp, exclude=out,
                                              labelled=lambda rel: ingest_stage.labels_for(rel, labels) is not None)
    rejects += scan_rejects
    ambiguous = ingest_stage.ambiguous_keys([s.relpath for s in sources], labels)
    rejects += [Reject(stage="ingest", item=f"labels entry {key}",
                       reason="names several images in the input folder; use the relative path") for key in sorted(ambiguous)]
    matched = {s.relpath: ingest_stage.labels_for(s.relpath, labels, ambiguous) for s in sources}
    logger.info("%d images in %s (%d rejected at scan), %d label entries", len(sources), inp, len(rejects), len(labels))

    weights = detect_stage.weights_path(config.detect)
    weights_sha = detect_stage.weights_sha256(weights)
    # Per kind of photograph (real, synthetic): the classes the detector was validated on, and
    # those whose silence may be stated as an absent finding (mAP50 measured on that kind).
    evidence = DetectorEvidence.of(weights, config.expand.negative_min_map50)
    if no_cache:
        config = config.model_copy(deep=True)
        config.expand.openai.cache = False
    expander = expand_stage.make_expander(config.expand, config.prompts_dir, out, run_id=run_id, evidence=evidence)
    chain_prompts = chain_stage.all_templates(config.prompts_dir, config.chain.languages)
    expand_fp, chain_fp = fingerprint(expander.prompts), fingerprint(chain_prompts)

    tasks = {name: t.with_options(result_storage=storage) for name, t in
             {"ingest": ingest_task, "detect": detect_task, "crop": crop_task, "expand": expand_task,
              "chain": chain_task}.items()}
    futures: dict[str, list] = {stage: [] for stage in STAGES}
    # Content-stable shards: an added or removed photograph changes one shard, not every later one.
    shards = assign_shards(sources, load_assignment(out, config.shard_size), config.shard_size)
    save_assignment(out, config.shard_size, shards)
    for shard, batch in shards.items():
        shard_labels = {s.relpath: matched[s.relpath] for s in batch if matched[s.relpath]}
        keys = stage_keys(batch, shard_labels, config, expand_fp, chain_fp, weights_sha, evidence, inp, out)
        common = dict(shard=shard, out=str(out), config=config)
        stale = no_cache

        def submit(stage, **kw):
            # A cache record must not hit when its shard files were deleted, when the shard was left
            # incomplete (failed or unsent model requests), or when an upstream stage recomputes.
            nonlocal stale
            files = shard_files(out, stage, shard, keys[stage])
            stale = (stale or not all(p.exists() for p in files.values())
                     or incomplete_marker(out, stage, shard, keys[stage]).exists()
                     or (stage == "crop" and not _crops_present(files["regions"])))
            stage_task = tasks[stage].with_options(refresh_cache=True) if stale else tasks[stage]
            future = stage_task.submit(stage=stage, key=keys[stage], **common, **kw)
            futures[stage].append(future)
            return future

        i = submit("ingest", input_dir=str(inp), sources=batch, labels=shard_labels)
        d = submit("detect", ingested=i)
        c = submit("crop", ingested=i, detected=d, evidence=evidence)
        e = submit("expand", ingested=i, cropped=c, evidence=evidence)
        submit("chain", ingested=i, cropped=c, expanded=e)

    _follow(futures, BuildProgress.start(out, STAGES, {n: len(batch) for n, batch in shards.items()}), logger)
    stage_rows: dict[str, list[dict]] = {}
    outputs: dict[str, list[ShardOutput]] = {}
    usage: list[dict] = []
    errors: list[str] = []
    for stage in STAGES:
        stage_rows[stage], outputs[stage] = [], []
        for shard, future in zip(shards, futures[stage]):
            future.wait()
            state = future.state
            if state.is_completed():
                result: ShardOutput = future.result()
                outputs[stage].append(result)
                rejects += result.rejects
                cached = state.name == "Cached"
                stage_rows[stage].append({"shard": result.shard, "status": "cached" if cached else "computed",
                                          "rows": result.rows, "rejects": len(result.rejects),
                                          "complete": result.complete,
                                          "seconds": None if cached else result.seconds})
                if not cached and result.usage:
                    usage.append(result.usage)
            else:
                reason = f"{stage} failed for the whole shard: {state.message}"
                if state.is_failed():
                    rejects.append(Reject(stage=stage, item=f"shard {shard:05d}", reason=reason))
                    errors.append(reason)
                stage_rows[stage].append({"shard": shard, "status": state.name.lower(), "rows": 0, "rejects": 0})

    about = {
        "engine_version": fundus_engine.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input_dir": str(inp),
        "output_dir": str(out),
        "config": _public(config),
        "detector": {"weights": str(weights), "sha256": weights_sha,
                     "validated_on": evidence.validated,
                     "negatives_stated_for": {domain: [c for c in classes if c in LESIONS]
                                              for domain, classes in evidence.reliable.items()}},
        "expand_backend": expander.name,
        "prompts": [{"id": p.id, "version": p.version, "sha256": p.sha256}
                    for p in [*expander.prompts, *chain_prompts]],
    }
    result = write_task.with_options(result_storage=storage)(str(build_dir), outputs["ingest"], outputs["crop"],
                                                             outputs["chain"], rejects, config, about)
    _prune(out, {str(out / "stages" / o.stage / Path(f).name.split(".")[0])
                 for stage in STAGES for o in outputs[stage] for f in o.files.values()})

    unfinished = {stage: shards for stage, rows in stage_rows.items()
                  if (shards := [r["shard"] for r in rows if r["status"] not in ("cached", "computed")
                                 or not r.get("complete", True)])}
    seconds = time.monotonic() - started
    manifest = {
        **about,
        "model_usage": sum_usage(usage, config),
        "labels": {"entries": len(labels), "matched_images": sum(1 for v in matched.values() if v)},
        "stages": {stage: {"shards": len(rows), "computed": sum(r["status"] == "computed" for r in rows),
                           "cached": sum(r["status"] == "cached" for r in rows),
                           # task seconds of the shards computed now (they overlap across workers)
                           "seconds": round(sum(r.get("seconds") or 0 for r in rows), 2)}
                   for stage, rows in stage_rows.items()},
        "wall_seconds": round(seconds, 2),
        # False when a shard-stage failed or left model requests unanswered: the dataset holds
        # what finished, and the next run completes it from the stage files and response cache.
        "complete": not unfinished,
        "incomplete_shards": unfinished,
        **result,
    }
    write_stage.write_manifest(build_dir, manifest)  # last inside the build folder
    publish(out, build_dir)  # dataset, manifest, card, benchmark and rejects switch together
    _publish_artifacts(stage_rows, manifest, out, rejects, seconds)
    logger.info("wrote %d records (%s) to %s; %d rejects", result["records"], result["records_per_task"],
                out / "dataset", result["rejects"])
    if result["detector_domain"].get("warning"):
        logger.warning(result["detector_domain"]["warning"])
    if errors:  # everything that finished is written above; now say clearly why the run is not whole
        raise RuntimeError(f"{len(errors)} shard-stage(s) failed; the dataset holds the rest. First: {errors[0]}")
    return manifest


def _public(config: BuildConfig) -> dict:
    """The config as written to the manifest and card: server URLs without credentials."""
    data = config.model_dump(mode="json")
    data["expand"]["openai"]["base_url"] = redact_url(config.expand.openai.base_url)
    return data


def sum_usage(usage: list[dict], config: BuildConfig) -> dict:
    """Model calls, tokens and estimated cost spent by this run (cached shards cost nothing)."""
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

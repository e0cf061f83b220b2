"""The `build-fundusgen` Prefect flow: thin orchestration of the library's shard runner.

Every shard-stage (`fundus_engine.stages`) is one task running `runner.run_shard_stage`, which
keys it by content, reuses a whole completion record and writes a new one last; shards run side
by side, and on one shard each stage after the one before it (`flows/scheduling.py`). The end of
the run (`runner.finish_build`) publishes the dataset, card, benchmark and manifest in one step.
What Prefect adds: the deployment, task runners, per-shard task runs, artifacts and logs.

The task runner is `config.runner` (thread, dask or ray; `flows/runners.py`): callers pick it
with `build_fundusgen.with_options(task_runner=task_runner_for(config.runner))`, and a run whose
runner is not the one its config names (a deployment run with `config={"runner": ...}`) runs
this same flow again as a subflow on that runner.

No `from __future__ import annotations` here: a served flow validates its parameters from
the real annotation, and a string "BuildConfig" is left undefined in the runner.
"""

import os
import time
from contextlib import nullcontext
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from fundus_engine import write as write_stage
from fundus_engine.config import BuildConfig
from fundus_engine.handoff import PIXELS
from fundus_engine.image_paths import IMAGES_DIR, published_paths
from fundus_engine.models import Reject
from fundus_engine.progress import BuildProgress
from fundus_engine.publish import BuildLock
from fundus_engine.runner import (STAGE_NAMES, Completion, Plan, RunContext, Shard, StageOutcome, finish_build,
                                  plan_build, run_shard_stage)

from flows.runners import check_same_code, detect_resources, runs_on, task_runner_for, this_process
from flows.scheduling import run_shards


@task(task_run_name="{stage}-{shard.number:05d}", cache_policy=NO_CACHE)
def shard_stage_task(stage: str, ctx: RunContext, shard: Shard, upstream: dict, flow_process: str = "") -> Completion:
    """One stage on one shard; `upstream` holds the completions (futures) of the stages before.
    In another process than the flow's (`flow_process`), the code must be the flow's."""
    check_same_code(stage, ctx, flow_process or this_process())
    return run_shard_stage(stage, ctx, shard, upstream)


@task(task_run_name="write", cache_policy=NO_CACHE)
def write_task(ctx: RunContext, plan: Plan, outcomes: list[StageOutcome], started: float) -> dict:
    return finish_build(ctx, plan, outcomes, started)


def _stage_rows(outcomes: list[StageOutcome]) -> dict[str, list[dict]]:
    """Per stage, one row per shard: computed or cached, rows out, rejects (the stage artifacts)."""
    rows: dict[str, list[dict]] = {stage: [] for stage in STAGE_NAMES}
    for o in outcomes:
        c = o.completion
        rows[o.stage].append({"shard": o.shard, "status": ("cached" if c.reused else "computed") if c else o.state,
                              "rows": c.rows if c else 0, "rejects": len(c.rejects) if c else 0,
                              "complete": bool(c and c.complete), "seconds": c.seconds if c and not c.reused else None})
    return rows


def _publish_artifacts(stage_rows: dict[str, list[dict]], summary: dict, out: Path, rejects: list[Reject],
                       seconds: float) -> None:
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
    if not runs_on(FlowRunContext.get().task_runner, config.runner):  # e.g. a deployment run asking for dask
        get_run_logger().info("running the build on the %s runner %s", config.runner.kind,
                              config.runner.address or "(a local cluster)")
        on_runner = build_fundusgen.with_options(task_runner=task_runner_for(config.runner, config.detect),
                                                 flow_run_name=f"{flow_run.get_name()}-on-{config.runner.kind}")
        return _ended(on_runner(input_dir, output_dir, config, no_cache))
    inp, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    run_id = str(flow_run.get_id())
    with BuildLock(out, run=run_id) as lock:  # a second build into OUT stops here, naming this one
        if lock.taken_over:
            get_run_logger().warning("took over the lock of a build that ended without releasing it: %s",
                                     lock.taken_over)
        manifest = _build(RunContext.create(inp, out, config, run_id, no_cache))
    return _ended(manifest)


def _ended(manifest: dict):
    if not manifest["complete"]:  # finished, not whole: a state of its own, the manifest as its result
        return Completed(name="Incomplete", data=manifest,
                         message=f"incomplete: re-run the same build to finish {manifest['incomplete_shards']}")
    return manifest


def _build(ctx: RunContext) -> dict:
    started = time.monotonic()
    logger = get_run_logger()
    plan = plan_build(ctx)
    logger.info("%d images in %s in %d shards (%d rejected at scan), %d label entries",
                sum(len(s.sources) for s in plan.shards), ctx.input_dir, len(plan.shards), len(plan.rejects),
                plan.label_entries)
    if plan.patient_pseudonyms == "unkeyed":
        logger.warning("patient pseudonyms are unkeyed digests: an identifier from a small space (a record number) "
                       "can be matched to its pseudonym by hashing candidates; set a secret of 16 or more characters "
                       "in %s to key them", ctx.config.ingest.patient_key_env)
    if plan.identifiers_in_paths:
        if published_paths(ctx.config.write.image_paths, plan.identifiers_in_paths) == "source":
            logger.warning("%d photographs' file paths hold their patient's identifier, and the records name those "
                           "paths (write.image_paths: source); set write.image_paths: content (or auto) to name them "
                           "by content hash", plan.identifiers_in_paths)
        else:
            logger.info("%d photographs' file paths hold their patient's identifier: the records name copies by "
                        "content hash under %s", plan.identifiers_in_paths, ctx.out / IMAGES_DIR)
    task_runner = FlowRunContext.get().task_runner

    def submit(stage: str, shard: Shard, upstream: dict):
        # detect asks the cluster for a GPU when its device is CUDA (nothing on the CPU)
        with detect_resources(task_runner, ctx.config.detect) if stage == "detect" else nullcontext():
            return shard_stage_task.submit(stage, ctx, shard, upstream, this_process())

    progress = BuildProgress.start(ctx.out, STAGE_NAMES, {s.number: len(s.sources) for s in plan.shards})
    try:
        outcomes = run_shards(plan.shards, submit, task_runner, progress, logger)
    finally:  # stopped or not, no photograph stays held in this process for a stage to come
        PIXELS.clear()
    manifest = write_task(ctx, plan, outcomes, started)
    rejects = [*plan.rejects, *(r for o in outcomes if o.completion for r in o.completion.rejects)]
    _publish_artifacts(_stage_rows(outcomes), manifest, ctx.out, rejects, manifest["wall_seconds"])
    logger.info("wrote %d records (%s) to %s; %d rejects", manifest["records"], manifest["records_per_task"],
                ctx.out / "dataset", manifest["rejects"])
    if manifest["detector_domain"].get("warning"):
        logger.warning(manifest["detector_domain"]["warning"])
    failed = [o for o in outcomes if o.state == "failed"]
    if failed:  # everything that finished is written; now say clearly why the run is not whole
        raise RuntimeError(f"{len(failed)} shard-stage(s) failed; the dataset holds the rest. "
                           f"First: {failed[0].stage} failed for the whole shard: {failed[0].failure}")
    return manifest

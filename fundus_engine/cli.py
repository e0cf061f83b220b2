"""`fundus-engine`: synth, build, serve, train-detector, export, score, inspect."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

# The temporary server that `build` starts would try to send telemetry,
# which fails loudly on an offline machine; a user's own setting still wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(soft_wrap=True)  # paths in messages stay whole, greppable


@app.command()
def synth(n: int = typer.Option(32, "--n", help="number of images"),
          seed: int = typer.Option(0, help="same seed, same images"),
          out: Path = typer.Option(..., help="folder to write"),
          size: int = typer.Option(512, help="image side in pixels"),
          full_labels: bool = typer.Option(False, help="also write disc/fovea points and boxes to labels.json")):
    """Write synthetic fundus photographs with ground truth (labels.json, YOLO labels)."""
    from fundus_engine.synth import generate

    records = generate(out, n, seed=seed, size=size, full_labels=full_labels)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.grade or r.diagnosis] = counts.get(r.grade or r.diagnosis, 0) + 1
    console.print(f"wrote {len(records)} images to {out}: {counts}")


EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 1, 2, 3  # `build`: 0 complete


@app.command()
def build(input: Path = typer.Option(..., "--input", help="folder of fundus images (+ labels.json/csv)"),
          out: Path = typer.Option(..., "--out", help="output folder"),
          config: Optional[Path] = typer.Option(None, "--config", help="YAML or JSON build config"),
          workers: Optional[int] = typer.Option(None, help="shards processed at once: threads, or the worker processes "
                                                "of a local dask/ray cluster (default: CPU count)"),
          runner: Optional[str] = typer.Option(None, "--runner", help="thread (default), dask or ray (needs the "
                                               "`scale` extra); overrides the config's runner.kind"),
          address: Optional[str] = typer.Option(None, "--address", help="an existing cluster: Dask scheduler "
                                                "tcp://HOST:8786 or Ray HOST:6379 / ray://HOST:10001 (default: a "
                                                "local cluster for the run)"),
          no_cache: bool = typer.Option(False, "--no-cache", help="recompute every stage and re-send every model request"),
          verbose: bool = typer.Option(False, "--verbose", help="Prefect's log lines on the console (default: OUT/logs/build.log)")):
    """Run the build-fundusgen flow here (on a temporary Prefect server unless PREFECT_API_URL names one),
    its shard-stages on threads, or on a Dask or Ray cluster (`--runner`)."""
    from fundus_engine.config import BuildConfig, RunnerConfig
    from fundus_engine.labels import patient_key

    try:
        cfg = BuildConfig.load(config)
        overrides = {k: v for k, v in {"kind": runner, "address": address, "workers": workers}.items() if v is not None}
        if overrides:
            cfg = cfg.model_copy(update={"runner": RunnerConfig.model_validate({**cfg.runner.model_dump(), **overrides})})
        patient_key(cfg.ingest)  # a key too short to be secret stops the build before it starts
        # Prefect (and its logging) only for a build that will run
        from flows.build_fundusgen import build_fundusgen
        from flows.runners import check_api_reachable, temporary_api

        task_runner = _task_runner(cfg)
        check_api_reachable(cfg.runner.address)
    except (ValueError, OSError, ImportError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE)
    flow = build_fundusgen.with_options(task_runner=task_runner)
    try:
        with _progress_display(out, quiet_logs=not verbose), temporary_api():
            manifest = flow(input_dir=str(input), output_dir=str(out), config=cfg, no_cache=no_cache)
    except Exception as exc:  # the flow has written what finished; say why it is not whole
        console.print(f"[red]build failed:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED)
    _print_summary(manifest)
    if not manifest["complete"]:
        console.print(f"[bold yellow]incomplete:[/bold yellow] shards left to finish {manifest['incomplete_shards']}; "
                      "the dataset holds what finished. Re-run the same command to finish them (finished work and "
                      "model answers are reused).")
        raise typer.Exit(EXIT_INCOMPLETE)


def _task_runner(cfg):
    """The task runner the config names; a missing `scale` extra is said plainly."""
    from flows.runners import task_runner_for

    try:
        return task_runner_for(cfg.runner, cfg.detect)
    except ImportError as exc:
        raise ImportError(f"runner {cfg.runner.kind} needs the scale extra: pip install 'fundus-engine[scale]' "
                          f"({exc})") from exc


@app.command()
def serve(limit: Optional[int] = typer.Option(None, help="flow runs at once")):
    """Serve the build-fundusgen deployment (needs PREFECT_API_URL pointing at a server)."""
    from flows.serve import serve as serve_flow

    serve_flow(limit=limit)


@app.command("train-detector")
def train_detector(config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON of TrainDetectorParams (masks go here)"),
                   out: Optional[Path] = typer.Option(None, "--out", help="weights file to write (.pt)"),
                   dataset: list[Path] = typer.Option([], "--dataset", help="folder in a public layout: IDRiD, DDR, "
                                                      "FGADR, e-ophtha, images/<DATASET> + masks/<DATASET> (repeatable)"),
                   yolo: list[Path] = typer.Option([], "--yolo", help="YOLO-format folder (repeatable)"),
                   coco: list[str] = typer.Option([], "--coco", help="COCO JSON, or JSON:IMAGES_DIR (repeatable)"),
                   synthetic: Optional[int] = typer.Option(None, help="synthetic photographs to add"),
                   folds: Optional[int] = typer.Option(None, help="k-fold cross-validation on the real photographs"),
                   unlabelled: Optional[Path] = typer.Option(None, help="unlabelled images for self-training"),
                   rounds: Optional[int] = typer.Option(None, help="self-training rounds"),
                   confidence: Optional[float] = typer.Option(None, help="pseudo-label confidence threshold"),
                   epochs: Optional[int] = typer.Option(None), imgsz: Optional[int] = typer.Option(None),
                   batch: Optional[int] = typer.Option(None),
                   base_model: Optional[str] = typer.Option(None, help="model .yaml (from scratch) or local .pt weights"),
                   held_out: Optional[Path] = typer.Option(None, help="dataset.yaml to validate on")):
    """Train a detector from public dataset layouts, YOLO folders, COCO JSON, lesion masks and synthetic images, offline."""
    from fundus_engine.config import TrainDetectorParams, read_config_file

    try:
        data = read_config_file(config) if config else {}
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE)
    flags = {"output": out, "synthetic": synthetic, "folds": folds, "unlabelled": unlabelled,
             "self_training_rounds": rounds, "pseudo_label_confidence": confidence, "epochs": epochs, "imgsz": imgsz,
             "batch": batch, "base_model": base_model, "held_out": held_out}
    data.update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None})
    data["datasets"] = [*data.get("datasets", []), *map(str, dataset)]
    data["yolo"] = [*data.get("yolo", []), *map(str, yolo)]
    data["coco"] = [*data.get("coco", []), *({"annotations": c.split(":", 1)[0],
                                               "images": c.split(":", 1)[1] if ":" in c else None} for c in coco)]
    try:
        params = TrainDetectorParams.model_validate(data)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {config or 'options'}: {exc}")
        raise typer.Exit(EXIT_USAGE)
    from flows.train_detector import train_detector as flow  # Prefect is imported once the parameters are valid

    meta = flow(params)
    for v in meta["validations"]:
        folds_run = v.get("folds", [])
        table = Table("class", *(f"fold {f['fold'] + 1}" for f in folds_run), "mAP50",
                      title=f"{params.output}: {v['domain']} photographs, {v['method']}, {v['images']} images "
                            f"({', '.join(v['datasets'])}): mAP50 {v['mAP50']}")
        for name, ap in v["per_class_mAP50"].items():
            table.add_row(name, *(str(f["per_class_mAP50"].get(name, "-")) for f in folds_run), str(ap))
        console.print(table)
    if not meta["validations"]:
        console.print("no held-out images with annotated boxes: the weights carry no validation")
    for r in meta["self_training"][1:]:
        console.print(f"round {r['round']}: {r['pseudo_images']} pseudo-labelled images, mAP50 {r['mAP50']}")


@app.command()
def export(out: Path = typer.Argument(..., help="output folder of a build")):
    """Write InternVL (jsonl + meta), LLaVA and LLaMA-Factory exports of the dataset under OUT/exports/."""
    from fundus_engine.export import ExportError, export_all

    try:
        written = export_all(out)
    except (ExportError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE)
    for name, path in written.items():
        console.print(f"{name}: {path}")


@app.command()
def score(questions: Path = typer.Argument(..., help="OUT/benchmark/test.parquet"),
          answers: Path = typer.Argument(..., help='model replies: JSONL {"index", "prediction"} or TSV/CSV')):
    """Accuracy of a model's answers on the benchmark, overall and per task, granularity and category."""
    from fundus_engine.mcq import read_benchmark
    from fundus_engine.mcq_scoring import read_answers, score as score_answers

    try:
        result = score_answers(read_benchmark(questions), read_answers(answers))
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE)
    console.print(f"accuracy {result['accuracy']:.3f} ({result['correct']}/{result['questions']}); "
                  f"unanswered {result['unanswered']}, unparseable {result['unparseable']}")
    for key, title in (("per_task", "clinical task"), ("per_granularity", "granularity"), ("per_category", "category")):
        table = Table(title, "correct", "questions", "accuracy")
        for name, b in result[key].items():
            table.add_row(name, str(b["correct"]), str(b["questions"]), f"{b['accuracy']:.3f}")
        console.print(table)


@app.command("score-reports")
def score_reports(out: Path = typer.Argument(..., help="output folder of a build"),
                  reports: Path = typer.Argument(..., help='generated reports: JSONL {"sha256", "report"}')):
    """Clinical consistency of generated reports against the build's labels (FundusExpert's rule)."""
    from fundus_engine.report_scoring import score_build_reports

    try:
        result = score_build_reports(out, reports)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE)
    ratio = "n/a" if result["ratio"] is None else f"{result['ratio']:.3f}"
    console.print(f"consistency {ratio} ({result['score']}/{result['total']}) over {result['reports']} reports; "
                  f"{result['no_truth']} without lesion labels left out")
    outcomes = ("correct_present", "correct_absent", "missed", "negated_positive", "false_present", "contradicted")
    table = Table("finding", *outcomes)
    for finding, counts in result["per_finding"].items():
        if counts:
            table.add_row(finding, *(str(counts.get(o, 0)) for o in outcomes))
    console.print(table)


@app.command()
def inspect(out: Path = typer.Argument(..., help="output folder of a build"),
            stage: Optional[str] = typer.Option(None, help="ingest, detect, crop, expand, chain or dataset"),
            rows: int = typer.Option(3, help="sample rows to show"),
            overlays: int = typer.Option(4, help="overlay images to write"),
            max_side: int = typer.Option(1280, help="longest side of an overlay, pixels"),
            overlay_format: str = typer.Option("jpg", help="overlay file format: jpg or png")):
    """Per-stage counts and sample rows; overlays of the boxes and landmarks for a sample."""
    from fundus_engine import inspection as ins

    if overlay_format not in ("jpg", "png"):
        console.print(f"[red]error:[/red] --overlay-format {overlay_format!r}: jpg or png")
        raise typer.Exit(EXIT_USAGE)
    try:
        manifest = ins.manifest(out)
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE)
    table = Table("stage", "table", "rows", title=f"{out}")
    for name, tables in ins.stage_counts(out).items():
        for tname, n in tables.items():
            table.add_row(name, tname, str(n))
    console.print(table)
    _print_summary(manifest)
    counts = ins.stage_counts(out)
    if stage and stage != "dataset" and stage not in counts:
        console.print(f"[red]error:[/red] unknown stage {stage!r}; one of {', '.join([*counts, 'dataset'])}")
        raise typer.Exit(EXIT_USAGE)
    for table_name in (counts[stage] if stage and stage != "dataset" else ["*"]) if rows > 0 else []:
        console.rule(f"{stage or 'dataset'} {table_name if table_name != '*' else ''}")
        for row in ins.sample_rows(out, stage or "dataset", rows, table=table_name):
            console.print_json(json.dumps(row, default=str))
    for path in ins.write_overlays(out, overlays, max_side=max_side, fmt=overlay_format):
        console.print(f"overlay: {path}")


@contextlib.contextmanager
def _progress_display(out: Path, quiet_logs: bool):
    """A live table per stage (shards done, images/s, ETA, rejects) read from the build's progress
    file, on a terminal; a plain line per finished stage otherwise. With `quiet_logs`, Prefect's
    log lines go to OUT/logs/build.log and only its warnings reach the console."""
    import logging
    import threading

    from rich.live import Live

    from fundus_engine.progress import read_progress

    Path(out, "logs").mkdir(parents=True, exist_ok=True)
    (Path(out) / "logs" / "progress.json").unlink(missing_ok=True)  # not the last build's
    consoles = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    levels = [h.level for h in consoles]
    log_file = logging.FileHandler(Path(out) / "logs" / "build.log")
    log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    if quiet_logs:
        for handler in consoles:
            handler.setLevel(logging.WARNING)
        logging.getLogger("prefect").addHandler(log_file)
    stop = threading.Event()

    def table() -> Table:
        view = Table("stage", "shards", "cached", "images/s", "rejects", title="building")
        for stage, s in ((read_progress(out) or {}).get("stages") or {}).items():
            rate = s["images"] / s["seconds"] if s["seconds"] and s["images"] else None
            view.add_row(stage, f"{s['done']}/{s['total']}", str(s["cached"]), f"{rate:.1f}" if rate else "-",
                         str(s["rejects"]))
        return view

    def follow() -> None:
        if console.is_terminal:
            with Live(table(), console=console, refresh_per_second=2) as live:
                while not stop.wait(0.5):
                    live.update(table())
                live.update(table())
            return
        said: set[str] = set()
        while True:
            stopped = stop.wait(1.0)
            for stage, s in ((read_progress(out) or {}).get("stages") or {}).items():
                if s["done"] == s["total"] and stage not in said:
                    said.add(stage)
                    console.print(f"{stage}: {s['done']} shard{'s' * (s['done'] != 1)} done ({s['cached']} cached), {s['images']} images "
                                  f"computed, {s['rejects']} rejects")
            if stopped:
                return

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(5)
        for handler, level in zip(consoles, levels):
            handler.setLevel(level)
        logging.getLogger("prefect").removeHandler(log_file)
        log_file.close()


def _print_summary(manifest: dict) -> None:
    table = Table("task", "records", title=f"{manifest['records']} records from {manifest['images']} images")
    for task, n in manifest["records_per_task"].items():
        table.add_row(task, str(n))
    console.print(table)
    console.print(f"splits (images): {manifest['images_per_split']}")
    console.print(f"rejects: {manifest['rejects']} {manifest['rejects_per_stage']} -> {manifest['output_dir']}/rejects.parquet")
    if manifest.get("benchmark"):
        bench = manifest["benchmark"]
        console.print(f"benchmark: {bench['questions']} questions on {bench['images']} held-out images "
                      f"{bench['per_task']} -> {manifest['output_dir']}/benchmark/test.tsv")
    if manifest.get("model_usage"):
        console.print(f"model usage: {manifest['model_usage']}")
    console.print(f"dataset: {manifest['output_dir']}/dataset  ({manifest['wall_seconds']} s)")
    domain = manifest.get("detector_domain") or {}
    if domain.get("disc_source"):
        console.print(f"optic disc from: {domain['disc_source']}")
    if domain.get("warning"):
        console.print(f"[bold yellow]warning:[/bold yellow] {domain['warning']}")


if __name__ == "__main__":
    app()

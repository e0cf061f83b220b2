"""Scale: images/s and peak memory of whole builds as the input grows, per runner.

Run: `python bench/scale.py` (N = 1,000, 5,000, 20,000 on thread, dask and ray), or a subset:
`python bench/scale.py --sizes 1000,5000 --runners thread,dask`. `make bench-scale` runs the default.

Images: N synthetic 256-px photographs (`fundus_engine.synth.render`, seed 7, image-level labels:
patient, eye, diagnosis, grade) drawn once into a pool on all cores (`--pool`, default
`bench/out/scale-pool`, kept and reused; a larger N extends it) and hard-linked into one input
folder per N. Config: the defaults (offline expander, the shipped demo detector, `detect.backend:
auto`, shard_size 64); the runner from the CLI's `--runner` (thread: Prefect's thread pool, one
thread per core; dask and ray: a local cluster of `--workers` worker processes, 2 by default;
`dask:1` names a worker count).

Each (N, runner) is one fresh child process running `fundus-engine build --input IN --out OUT
[--runner dask --workers 2]` (the CLI's own code, in the child, with `runner.finish_build` timed;
Prefect's temporary server; one PREFECT_HOME for the bench), so peak memory of one measurement
never carries over to the next. The parent samples the child's process tree every 0.2 s (psutil:
the child, its worker processes and theirs) and reports:
- `peak RSS MB (tree)`: the largest sum of RSS over the tree at one sample, without Prefect's API
  server (a service a deployment runs elsewhere; shown apart as `server MB`). RSS sums count pages
  shared between processes (forked workers, libraries) once per process: an upper bound.
- `main MB`: the child's own peak (`getrusage(RUSAGE_SELF).ru_maxrss`, exact); `finish +MB`: how far
  its RSS rose above its level when the end of the run began (sampled every 20 ms): the
  streaming write's own memory.
- `cores busy`: CPU seconds (user + system) of the tree's processes over the child's wall time: how
  much of the machine the runner kept busy.
- `images/s`: images / flow wall seconds (manifest `wall_seconds`: planning, shard stages, the end
  of the run); `stages images/s`: images / the shard-stage phase (`OUT/logs/progress.json`: when
  the last shard-stage finished), the CPU-bound part; `finish s`: the end of the run
  (`runner.finish_build`), timed around the call.
- where the time goes: each stage's task seconds (manifest `stages.*.seconds`, summed over shards;
  with 2 workers they overlap, so their sum can exceed the wall time).
The baseline is the thread runner at the smallest N, measured in the same run; the ratios are peak
RSS at the largest N over the smallest (target <= 1.3x), and dask with 2 worker processes over
the thread runner's one process in stage images/s at each N (target >= 1.5x). The machine's load
average is printed with each build: on a shared machine, other work slows a build down.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("ingest", "detect", "crop", "expand", "chain")
SEED = 7
SIZE = 256
MB = 1024 * 1024


# ------------------------------------------------------------------ images

def _draw(index: int, pool: str) -> dict:
    from fundus_engine.synth import render, write_marked_jpeg

    image, truth = render(SEED, index, SIZE)
    name = f"synth_s{SEED}_{index:06d}_{truth.laterality}.jpg"
    path = Path(pool) / "images" / name
    if not path.exists():
        tmp = path.with_name(f".{name}.tmp.jpg")
        write_marked_jpeg(tmp, image)
        tmp.replace(path)
    entry = asdict(truth)
    for key in ("disc", "fovea", "disc_diameter", "cup_to_disc", "boxes"):  # image-level labels only
        entry.pop(key)
    entry["image"] = f"images/{name}"
    return entry


def ensure_pool(pool: Path, n: int, processes: int) -> tuple[list[dict], float]:
    """The first n photographs of the pool (drawn now, on `processes` cores, where missing) and the
    seconds spent drawing."""
    from multiprocessing import get_context

    (pool / "images").mkdir(parents=True, exist_ok=True)
    index_file = pool / "entries.jsonl"
    entries = [json.loads(line) for line in index_file.read_text().splitlines()] if index_file.exists() else []
    entries = entries[:n] if all((pool / e["image"]).exists() for e in entries[:n]) else []
    started = time.perf_counter()
    if len(entries) < n:
        with get_context("spawn").Pool(processes) as workers:
            entries += workers.starmap(_draw, [(i, str(pool)) for i in range(len(entries), n)], chunksize=64)
        index_file.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return entries[:n], time.perf_counter() - started


def input_folder(pool: Path, entries: list[dict], dest: Path) -> Path:
    """The first N photographs hard-linked (copied across file systems) with their labels.json."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "images").mkdir(parents=True)
    for e in entries:
        src, dst = pool / e["image"], dest / e["image"]
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    (dest / "labels.json").write_text(json.dumps({"images": entries}))
    return dest


# ------------------------------------------------------------------ one build (child process)

def runner_spec(spec: str, workers: int) -> tuple[str, str, int | None]:
    """`thread`, `dask`, `ray` or `dask:1` -> (label, kind, worker processes or None)."""
    kind, _, count = spec.partition(":")
    if kind not in ("thread", "dask", "ray"):
        raise SystemExit(f"unknown runner {spec!r}: thread, dask, ray (dask:N, ray:N for N worker processes)")
    if kind == "thread":
        return "thread", kind, None
    n = int(count) if count else workers
    return f"{kind}:{n}", kind, n


def child(args) -> int:
    """One build in this process, exactly as `fundus-engine build --input IN --out OUT [--runner KIND
    --workers N]` runs it (the CLI's own code: config, task runner, Prefect's temporary server), with
    the end of the run timed; writes what it measured to args.result (JSON)."""
    sys.path.insert(0, str(ROOT))
    import flows.build_fundusgen as flow_module
    from fundus_engine.cli import app

    _, kind, n = runner_spec(args.runner, args.workers)
    finish = flow_module.finish_build
    timing = {}

    def timed_finish(*a, **kw):  # and its own memory: RSS when it starts, and its peak, sampled
        import psutil

        me, stop = psutil.Process(), threading.Event()
        timing["rss_start"] = timing["rss_peak"] = me.memory_info().rss

        def sample():
            while not stop.wait(0.02):
                timing["rss_peak"] = max(timing["rss_peak"], me.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t = time.perf_counter()
        try:
            return finish(*a, **kw)
        finally:
            timing["finish"] = time.perf_counter() - t
            stop.set()
            sampler.join()

    flow_module.finish_build = timed_finish
    argv = ["build", "--input", args.input, "--out", args.out]
    if kind != "thread":
        argv += ["--runner", kind, "--workers", str(n)]
    started = time.perf_counter()
    code = app(argv, standalone_mode=False)
    call = time.perf_counter() - started
    if code not in (None, 0):
        raise SystemExit(f"fundus-engine {' '.join(argv)}: exit {code}")
    manifest = json.loads((Path(args.out) / "manifest.json").read_text())
    progress = json.loads((Path(args.out) / "logs" / "progress.json").read_text())
    Path(args.result).write_text(json.dumps({
        "images": manifest["images"], "records": manifest["records"], "complete": manifest["complete"],
        "wall_seconds": manifest["wall_seconds"], "cli_seconds": round(call, 2),
        "finish_seconds": round(timing.get("finish", float("nan")), 2),
        "finish_rss_start_mb": timing.get("rss_start", 0) / MB, "finish_rss_peak_mb": timing.get("rss_peak", 0) / MB,
        "stage_phase_seconds": max(s["seconds"] for s in progress["stages"].values()),
        "stage_seconds": {s: manifest["stages"][s]["seconds"] for s in STAGES},
        "rejects": manifest["rejects"],
        "main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reaped_children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))
    return 0


# ------------------------------------------------------------------ measuring (parent)

def _is_server(proc) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        return False
    return "uvicorn" in cmd or "prefect.server" in cmd


class TreeSampler:
    """Peak summed RSS of a process and its descendants, sampled on a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.every = every
        self.peak_tree = self.peak_server = self.peak_processes = 0
        self.samples = 0
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds (user + system) at its last sample, not the server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import psutil

        servers: dict[int, bool] = {}
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            tree = server = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    cpu = p.cpu_times()
                except psutil.Error:
                    continue
                if servers.setdefault(p.pid, _is_server(p)):
                    server += rss
                else:
                    tree += rss
                    self.cpu[p.pid] = cpu.user + cpu.system
            self.peak_tree = max(self.peak_tree, tree)
            self.peak_server = max(self.peak_server, server)
            self.peak_processes = max(self.peak_processes, sum(not servers.get(p.pid) for p in procs))
            self.samples += 1
            self._stop.wait(self.every)


def measure(inp: Path, work: Path, runner: str, workers: int, timeout: float) -> dict:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    result = work / "result.json"
    result.unlink(missing_ok=True)
    home = work.parent / "prefect-home"  # one for the bench's builds (they run one after another)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}  # a loaded machine starts it slowly
    env.pop("PREFECT_API_URL", None)  # ephemeral server, as `fundus-engine build`
    log = work / "child.log"
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, __file__, "--child", "--input", str(inp), "--out", str(out),
                                 "--runner", runner, "--workers", str(workers), "--result", str(result)],
                                env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        with TreeSampler(proc.pid) as sampler:
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "timeout"
    elapsed = time.perf_counter() - started
    if code != 0 or not result.exists():
        tail = log.read_text()[-2500:]
        return {"error": f"exit {code}", "log": str(log), "tail": tail}
    data = json.loads(result.read_text())
    data.update(process_seconds=round(elapsed, 1), peak_tree_rss_mb=sampler.peak_tree / MB,
                peak_server_rss_mb=sampler.peak_server / MB, processes=sampler.peak_processes,
                cpu_seconds=round(sum(sampler.cpu.values()), 1),
                samples=sampler.samples)
    shutil.rmtree(out, ignore_errors=True)  # crops and marked copies: GBs at 20,000 images
    return data


# ------------------------------------------------------------------ report

def finish_growth(r: dict) -> str:
    """How much the end of a run added to the main process's RSS at its peak."""
    if not r.get("finish_rss_peak_mb"):
        return "-"
    return f"{r['finish_rss_peak_mb'] - r['finish_rss_start_mb']:.0f}"


def cores_busy(r: dict) -> str:
    """CPU seconds of the build's processes over the child's life (startup included)."""
    return f"{r['cpu_seconds'] / r['process_seconds']:.2f}" if r.get("cpu_seconds") else "-"


def report(rows: list[dict], drawn: dict, cores: int) -> str:
    ok = [r for r in rows if "error" not in r]
    lines = [f"machine: {cores} cores; load average at start/end of each build: "
             + ", ".join(f"{r['label']}@{r['n']}: {r['load'][0]:.1f}/{r['load'][1]:.1f}" for r in ok),
             "photographs drawn: " + ", ".join(f"{n} in {s:.0f} s" for n, s in drawn.items() if s > 0.5),
             "",
             "| runner | N | images | records | images/s | stages images/s | finish s | flow wall s | "
             "peak RSS MB (tree) | main MB | finish +MB | server MB | processes | cores busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['n']} | failed: {r['error']} (log {r['log']}) |")
            continue
        lines.append(f"| {r['label']} | {r['n']} | {r['images']} | {r['records']} | {r['images'] / r['wall_seconds']:.1f} "
                     f"| {r['images'] / r['stage_phase_seconds']:.1f} | {r['finish_seconds']:.1f} | "
                     f"{r['wall_seconds']:.0f} | {r['peak_tree_rss_mb']:.0f} | {r['main_peak_rss_mb']:.0f} | "
                     f"{finish_growth(r)} | {r['peak_server_rss_mb']:.0f} | {r['processes']} | {cores_busy(r)} |")
    base = next((r for r in ok if r["label"] == "thread"), None)
    if base:
        small = min(r["n"] for r in ok if r["label"] == "thread")
        base = next(r for r in ok if r["label"] == "thread" and r["n"] == small)
        lines += ["", f"baseline: thread at N={small}: {base['images'] / base['wall_seconds']:.1f} images/s, "
                      f"peak RSS {base['peak_tree_rss_mb']:.0f} MB"]
    for label in dict.fromkeys(r["label"] for r in ok):
        mine = sorted((r for r in ok if r["label"] == label), key=lambda r: r["n"])
        if len(mine) > 1:
            lo, hi = mine[0], mine[-1]
            ratio = hi["peak_tree_rss_mb"] / lo["peak_tree_rss_mb"]
            main = hi["main_peak_rss_mb"] / lo["main_peak_rss_mb"]
            lines.append(f"{label}: peak RSS at N={hi['n']} / N={lo['n']}: {ratio:.2f}x (tree), {main:.2f}x (main "
                         f"process) {'<=' if ratio <= 1.3 else '>'} 1.3x target")
    for r in ok:
        if r["label"] != "thread":
            one = next((t for t in ok if t["label"] == "thread" and t["n"] == r["n"]), None)
            if one:
                speed = (r["images"] / r["stage_phase_seconds"]) / (one["images"] / one["stage_phase_seconds"])
                whole = (r["images"] / r["wall_seconds"]) / (one["images"] / one["wall_seconds"])
                lines.append(f"{r['label']} vs thread (one process) at N={r['n']}: {speed:.2f}x stage images/s "
                             f"({whole:.2f}x whole flow)" + ("; target >= 1.5x" if r["label"] == "dask:2" else ""))
    lines += ["", "where the time goes (task seconds per stage, summed over shards, and their share; finish = end "
                  "of the run):"]
    for r in ok:
        total = sum(r["stage_seconds"].values()) + r["finish_seconds"]
        parts = [f"{s} {r['stage_seconds'][s]:.0f} s ({100 * r['stage_seconds'][s] / total:.0f}%)" for s in STAGES]
        parts.append(f"finish {r['finish_seconds']:.0f} s ({100 * r['finish_seconds'] / total:.0f}%)")
        lines.append(f"  {r['label']}@{r['n']}: " + ", ".join(parts))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000,20000", help="comma-separated N")
    ap.add_argument("--runners", default="thread,dask,ray", help="comma-separated: thread, dask, ray, dask:1, ...")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for dask and ray")
    ap.add_argument("--pool", default=str(ROOT / "bench" / "out" / "scale-pool"),
                    help="where the synthetic photographs are drawn and kept for the next run")
    ap.add_argument("--work", default=None, help="scratch folder for inputs and outputs (default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per build")
    ap.add_argument("--json", default=None, help="also write the measurements here (after each build)")
    ap.add_argument("--report", default=None, metavar="JSON", help="print the table of an earlier run's --json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--runner", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(report(saved["rows"], {int(k): v for k, v in saved["drawn"].items()}, saved["cores"]))
        return 0
    sys.path.insert(0, str(ROOT))
    sizes = sorted(int(n) for n in args.sizes.split(","))
    runners = args.runners.split(",")
    if "thread" not in [r.split(":")[0] for r in runners]:
        runners.insert(0, "thread")  # the baseline, measured in the same run
    cores = os.cpu_count() or 1
    pool = Path(args.pool)
    entries, seconds = ensure_pool(pool, max(sizes), cores)
    drawn = {max(sizes): seconds}
    print(f"pool: {len(entries)} photographs in {pool} ({seconds:.0f} s drawing)", flush=True)
    rows = []
    scratch = tempfile.TemporaryDirectory(prefix="fundus-scale-") if args.work is None else None
    work = Path(args.work or scratch.name)
    try:
        for n in sizes:
            inp = input_folder(pool, entries[:n], work / f"in-{n}")
            for spec in runners:
                label, _, _ = runner_spec(spec, args.workers)
                load = os.getloadavg()[0]
                print(f"N={n} {label}: building ...", flush=True)
                r = measure(inp, work / f"run-{n}-{label.replace(':', '-')}", spec, args.workers, args.timeout)
                r.update(n=n, label=label, load=(load, os.getloadavg()[0]))
                rows.append(r)
                if args.json:  # kept as it goes: a long run's finished builds are never lost
                    Path(args.json).write_text(json.dumps({"rows": rows, "drawn": drawn, "cores": cores}, indent=1))
                if "error" in r:
                    print(f"N={n} {label}: {r['error']}\n{r['tail']}", flush=True)
                else:
                    print(f"N={n} {label}: {r['images'] / r['wall_seconds']:.1f} images/s, peak RSS "
                          f"{r['peak_tree_rss_mb']:.0f} MB (main {r['main_peak_rss_mb']:.0f} MB), finish "
                          f"{r['finish_seconds']:.1f} s, load {r['load'][0]:.1f}/{r['load'][1]:.1f}", flush=True)
            shutil.rmtree(inp, ignore_errors=True)
    finally:
        if scratch:
            scratch.cleanup()
    print()
    print(report(rows, drawn, cores))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

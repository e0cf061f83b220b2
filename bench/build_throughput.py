"""End-to-end build throughput against detect alone, per stage, for synthetic and real photographs.

Run: `make bench-build` (both image sets), or `python bench/build_throughput.py --sets synthetic --images 64`.

For each image set, one whole build (`flows.build_fundusgen.build_fundusgen`, in Prefect's local
test harness as tests/test_flow.py runs it; default config, so `detect.backend: auto`) into a
temporary folder, and detect alone (`fundus_engine.detect.detect` on the same ingested records,
same config and backend). The detector is loaded (exported if need be) and warm before both.

Per-stage seconds are the runner's task seconds (`manifest["stages"][stage]["seconds"]`: each
shard-stage from reading its inputs to writing its tables, summed over shards). On Prefect's thread
pool the shard-stages of different shards run side by side (`flows/scheduling.py`), so the stage
sums add up to more than the wall time; `--workers N` adds a build with `runner.workers: N` threads.
`write` is the end of the run (`runner.finish_build`: splits,
dataset, card, benchmark, manifest), timed around the call. `whole build` is the whole
`build_fundusgen` call. images/s = images / seconds; "x detect alone" is that rate over detect
alone's. "CPU s" is the process's CPU time (user + system, every thread) over the same span: on a
shared machine it moves less than the wall time, and CPU / wall says how many cores were busy.
The Prefect API server runs in a child process (the test harness's); its CPU time over the build is
printed apart. "CPU floor" is both CPU times over the cores this process may use: no build doing this much work is
faster, so its ratio to detect alone is the most any scheduling of the same stages could reach.

Where the time goes: every image decode (cv2.imdecode, "1/2" etc. for a JPEG decoded at reduced
scale; PIL's load, where a format is read through PIL) and encode (cv2.imwrite / imencode: crops,
box-marked copies) in the build is counted and timed, by the stage module that asked for it. A
photograph handed from one stage to the next (`fundus_engine.handoff`) is not decoded again, so a
stage's decodes per image say how often the handoff missed; `--profile N` adds cProfile tables of ingest and crop (run directly on N
images, outside the flow).

Images: `--images` synthetic 512-px photographs (fundus_engine.synth, seed 31337), and the real
photographs in ../shared/real_fundus/images (69, 565 to 4928 px wide, read in place, never copied).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "real_fundus" / "images"
STAGES = ("ingest", "detect", "crop", "expand", "chain")


class CodecCounter:
    """Counts and times cv2 decodes and encodes, by the fundus_engine module that asked."""

    WRAPPED = {"imdecode": "decode", "imdecodemulti": "decode", "imwrite": "encode", "imencode": "encode",
               "pil_load": "decode"}

    def __init__(self):
        self.calls = collections.Counter()
        self.seconds = collections.Counter()
        self.lock = threading.Lock()

    HELPERS = ("decoding",)  # modules that decode for a stage: the stage that called them is named
    REDUCED = {16: "decode 1/2", 32: "decode 1/4", 64: "decode 1/8"}  # IMREAD_REDUCED_COLOR_* bits

    @classmethod
    def asker(cls) -> str:
        frame = sys._getframe(2)
        while frame:
            path = frame.f_code.co_filename
            if ("/fundus_engine/" in path and Path(path).stem not in cls.HELPERS
                    and frame.f_code.co_name not in ("_write_jpeg", "_write_marked")):
                return Path(path).stem
            frame = frame.f_back
        return "other"

    @contextlib.contextmanager
    def installed(self):
        originals = {name: getattr(cv2, name) for name in self.WRAPPED if name != "pil_load"}

        def wrap(name, fn):
            def counted(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    what = self.WRAPPED[name]
                    if name == "imdecode" and len(args) > 1:
                        what = self.REDUCED.get(int(args[1]) & 0x70, what)
                    key = (self.asker(), what)
                    with self.lock:
                        self.calls[key] += 1
                        self.seconds[key] += time.perf_counter() - started
            return counted

        from PIL import ImageFile

        pil_load = ImageFile.ImageFile.load

        def load(image, *args, **kwargs):  # PIL decodes on load(); a loaded image's load() is free
            if not getattr(image, "tile", None):
                return pil_load(image, *args, **kwargs)
            return pil_decode(image, *args, **kwargs)

        from PIL import TiffImagePlugin

        pil_decode = wrap("pil_load", pil_load)
        libtiff = TiffImagePlugin.TiffImageFile._load_libtiff  # compressed TIFFs bypass ImageFile.load
        for name, fn in originals.items():
            setattr(cv2, name, wrap(name, fn))
        ImageFile.ImageFile.load = load
        TiffImagePlugin.TiffImageFile._load_libtiff = wrap("pil_load", libtiff)
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(cv2, name, fn)
            ImageFile.ImageFile.load = pil_load
            TiffImagePlugin.TiffImageFile._load_libtiff = libtiff


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_cpu_seconds() -> float:
    """CPU time of this process's live children (psutil, which Prefect's dependencies bring): the
    Prefect API server the test harness started, which records every task run's states on the same
    cores. A child that exits during the build is not counted."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def build_once(inp: Path, out: Path, config) -> tuple[dict, float, tuple[float, float], float, CodecCounter]:
    import flows.build_fundusgen as flow_module

    finish = flow_module.finish_build
    timing = {}

    def timed_finish(*args, **kwargs):
        started = time.perf_counter()
        try:
            return finish(*args, **kwargs)
        finally:
            timing["write"] = time.perf_counter() - started

    counter = CodecCounter()
    flow_module.finish_build = timed_finish
    try:
        with counter.installed():
            started, cpu, server = time.perf_counter(), cpu_seconds(), server_cpu_seconds()
            manifest = flow_module.build_fundusgen(str(inp), str(out), config)
            wall, cpu = time.perf_counter() - started, (cpu_seconds() - cpu, server_cpu_seconds() - server)
    finally:
        flow_module.finish_build = finish
    return manifest, wall, cpu, timing["write"], counter


def detect_alone(inp: Path, config, repeats: int) -> tuple[int, float, float]:
    """(images, seconds, CPU seconds) of the detect stage alone on the ingested photographs, best of `repeats`."""
    from fundus_engine import detect as detect_stage
    from fundus_engine.ingest import ingest
    from fundus_engine.labels import labels_for, load_labels
    from fundus_engine.photo_files import scan

    labels, _ = load_labels(inp, config.ingest)
    sources, _ = scan(inp, labelled=lambda rel: labels_for(rel, labels) is not None)
    matched = {s.relpath: entry for s in sources if (entry := labels_for(s.relpath, labels))}
    records, _ = ingest(inp, sources, matched, config.ingest)
    detect_stage.detect(records[: config.detect.batch], config.detect)  # loaded (exported) and warm
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        started, cpu = time.perf_counter(), cpu_seconds()
        detect_stage.detect(records, config.detect)
        best = min(best, (time.perf_counter() - started, cpu_seconds() - cpu))
    return len(records), *best


def table(name: str, images: int, manifest: dict, wall: float, cpus: tuple[float, float], write: float,
          alone: float, alone_cpu: float, counter: CodecCounter) -> str:
    alone_rate = images / alone
    cpu, server = cpus
    rows = [(stage, manifest["stages"][stage]["seconds"]) for stage in STAGES] + [("write (end of run)", write)]
    lines = [f"{name}: {images} images, {manifest['records']} records; detect backend {manifest.get('_backend')}",
             "", "| | seconds | images/s | x detect alone | CPU s |", "|---|---|---|---|---|",
             f"| detect alone | {alone:.2f} | {alone_rate:.1f} | 1.00 | {alone_cpu:.1f} |"]
    for label, seconds in rows:
        rate = images / seconds if seconds else float("inf")
        lines.append(f"| {label} | {seconds:.2f} | {rate:.1f} | {rate / alone_rate:.2f} | |")
    lines.append(f"| stages + write summed | {sum(s for _, s in rows):.2f} | | | |")
    lines.append(f"| **whole build (wall)** | {wall:.2f} | {images / wall:.1f} | **{images / wall / alone_rate:.2f}** "
                 f"| {cpu:.1f} |")
    # No build is faster than its CPU time spread over every core: the best ratio this much work allows
    cores = len(os.sched_getaffinity(0))
    floor = (cpu + server) / cores
    lines += ["", f"child processes (the Prefect API server; same cores): {server:.1f} CPU s during the build.",
              f"CPU floor: the build's {cpu:.1f} + {server:.1f} CPU s over {cores} cores = {floor:.2f} s, at best "
              f"{images / floor / alone_rate:.2f}x detect alone even with every stage overlapped; "
              f"{cpu + server - alone_cpu:.1f} CPU s of it is outside what detect alone spends"]
    lines += ["", "codec calls in the build (per image), seconds, by the stage that asked:"]
    for (who, what), calls in sorted(counter.calls.items()):
        lines.append(f"  {who:<10} {what:<10} {calls:6d} ({calls / images:4.1f}/image) {counter.seconds[who, what]:8.2f} s")
    return "\n".join(lines)


def profile_stages(inp: Path, config, images: int, top: int) -> str:
    """Where ingest's and crop's own time goes: cProfile of the stage functions on the first
    `images` photographs, outside the flow, on this thread (cProfile sees only the thread it runs
    in; functions by their own time)."""
    import cProfile
    import io
    import pstats

    from fundus_engine import crop as crop_stage
    from fundus_engine import detect as detect_stage
    from fundus_engine import ingest as ingest_stage
    from fundus_engine.evidence import DetectorEvidence
    from fundus_engine.photo_files import scan

    sources, _ = scan(inp)
    sources = sources[:images]
    out = []

    def profiled(label, fn):
        profiler = cProfile.Profile()
        result = profiler.runcall(fn)
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(top)
        body = [line for line in text.getvalue().splitlines() if line.strip()]
        total = stats.total_tt
        out.append(f"{label}: {total:.2f} s profiled for {len(sources)} images ({1000 * total / len(sources):.0f} "
                   f"ms/image); top {top} by own time:")
        out.extend("  " + line for line in body[body.index(next(x for x in body if "ncalls" in x)):])
        return result

    from fundus_engine.models import ImageRecord

    # photograph by photograph on this thread (the stage functions spread them over a thread pool)
    measured = profiled("ingest", lambda: [ingest_stage.ingest_image(inp, s, None, config.ingest) for s in sources])
    records = [r for r in measured if isinstance(r, ImageRecord)]
    detections, _ = detect_stage.detect(records, config.detect)
    evidence = DetectorEvidence.of(detect_stage.weights_path(config.detect), config.expand.negative_min_map50)
    with tempfile.TemporaryDirectory(prefix="fundus-crop-profile-") as tmp:
        profiled("crop", lambda: [crop_stage.crop_image(r, [d for d in detections if d.sha256 == r.sha256], Path(tmp),
                                                        config.crop, evidence.trusted_for(r)) for r in records])
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="synthetic,real", help="comma-separated: synthetic, real")
    ap.add_argument("--images", type=int, default=256, help="synthetic images")
    ap.add_argument("--real", default=str(REAL), help="folder of real photographs (read in place)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for detect alone")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile ingest and crop on N images of each set (cProfile, outside the flow)")
    ap.add_argument("--shard-size", type=int, default=0, metavar="N",
                    help="photographs per shard (default: the config's, 64)")
    ap.add_argument("--workers", type=int, default=0, metavar="N",
                    help="also build with `runner.workers: N` threads (default: the CPU count), so that the "
                         "stages of different shards can overlap")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    logging.getLogger("prefect").setLevel(logging.WARNING)
    from prefect.testing.utilities import prefect_test_harness

    from fundus_engine import detect as detect_stage
    from fundus_engine.config import BuildConfig
    from fundus_engine.synth import generate

    config = BuildConfig(**({"shard_size": args.shard_size} if args.shard_size else {}))
    identity = detect_stage.cache_identity(config.detect)
    tables = []
    with tempfile.TemporaryDirectory(prefix="fundus-build-bench-") as tmp, \
            prefect_test_harness(server_startup_timeout=120):
        tmp = Path(tmp)
        for name in args.sets.split(","):
            if name == "synthetic":
                inp = tmp / "synthetic"
                generate(inp, args.images, seed=31337)
                label = "synthetic 512-px (seed 31337)"
            elif name == "real":
                inp = Path(args.real).resolve()
                if not inp.is_dir():
                    print(f"{inp}: no real photographs here; skipped")
                    continue
                label = f"real photographs ({inp})"
            else:
                raise SystemExit(f"unknown set {name!r}")
            images, alone, alone_cpu = detect_alone(inp, config, args.repeats)
            manifest, wall, cpu, write, counter = build_once(inp, tmp / f"out-{name}", config)
            manifest["_backend"] = f"{identity['backend']} on {identity['device']}"
            assert manifest["images"] == images, (manifest["images"], images)
            tables.append(table(label, images, manifest, wall, cpu, write, alone, alone_cpu, counter))
            if args.workers:
                more = config.model_copy(update={"runner": config.runner.model_copy(update={"workers": args.workers})})
                manifest, wall, cpu, write, counter = build_once(inp, tmp / f"out-{name}-workers", more)
                manifest["_backend"] = f"{identity['backend']} on {identity['device']}"
                tables.append(table(f"{label}, runner.workers {args.workers}", images, manifest, wall, cpu, write,
                                    alone, alone_cpu, counter))
            if args.profile:
                tables.append(profile_stages(inp, config, args.profile, 8))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())

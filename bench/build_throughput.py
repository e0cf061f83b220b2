"""End-to-end build throughput against detect alone, per stage, for synthetic and real photographs.

Run: `python bench/build_throughput.py` (both image sets), or `--sets synthetic --images 64`.

For each image set, one whole build (`flows.build_fundusgen.build_fundusgen`, in Prefect's local
test harness as tests/test_flow.py runs it; default config, so `detect.backend: auto`) into a
temporary folder, and detect alone (`fundus_engine.detect.detect` on the same ingested records,
same config and backend). The detector is loaded (exported if need be) and warm before both.

Per-stage seconds are the runner's task seconds (`manifest["stages"][stage]["seconds"]`: each
shard-stage from reading its inputs to writing its tables, summed over shards; shards run on
Prefect's thread pool, so they overlap and their sum can exceed the wall time). `write` is the end
of the run (`runner.finish_build`: splits, dataset, card, benchmark, manifest), timed around the
call. `build wall` is the whole `build_fundusgen` call. images/s = images / seconds; "x detect"
is that rate over detect alone's.

Where the time goes: every image decode (cv2.imdecode / imdecodemulti: ingest, crop; PIL's
load: detect, as ultralytics opens a list of paths with PIL) and encode (cv2.imwrite / imencode: crops, box-marked copies) in the build is
counted and timed, by the stage module that asked for it; `--profile N` adds cProfile tables of
ingest and crop (run directly on N images, outside the flow).

Images: `--images` synthetic 512-px photographs (fundus_engine.synth, seed 31337), and the real
photographs in ../shared/real_fundus/images (69, 565 to 4928 px wide, read in place, never copied).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import logging
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

    @staticmethod
    def asker() -> str:
        frame = sys._getframe(2)
        while frame:
            path = frame.f_code.co_filename
            if "/fundus_engine/" in path and frame.f_code.co_name not in ("decode", "_write_jpeg"):
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
                    key = (self.asker(), self.WRAPPED[name])
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


def build_once(inp: Path, out: Path, config) -> tuple[dict, float, float, CodecCounter]:
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
            started = time.perf_counter()
            manifest = flow_module.build_fundusgen(str(inp), str(out), config)
            wall = time.perf_counter() - started
    finally:
        flow_module.finish_build = finish
    return manifest, wall, timing["write"], counter


def detect_alone(inp: Path, config, repeats: int) -> tuple[int, float]:
    from fundus_engine import detect as detect_stage
    from fundus_engine import ingest as ingest_stage

    labels, _ = ingest_stage.load_labels(inp, config.ingest)
    sources, _ = ingest_stage.scan(inp, labelled=lambda rel: ingest_stage.labels_for(rel, labels) is not None)
    matched = {s.relpath: entry for s in sources if (entry := ingest_stage.labels_for(s.relpath, labels))}
    records, _ = ingest_stage.ingest(inp, sources, matched, config.ingest)
    detect_stage.detect(records[: config.detect.batch], config.detect)  # loaded (exported) and warm
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        detect_stage.detect(records, config.detect)
        best = min(best, time.perf_counter() - started)
    return len(records), best


def table(name: str, images: int, manifest: dict, wall: float, write: float, alone_rate: float,
          counter: CodecCounter) -> str:
    alone = images / alone_rate
    rows = [(stage, manifest["stages"][stage]["seconds"]) for stage in STAGES] + [("write", write)]
    lines = [f"{name}: {images} images, {manifest['records']} records; backend {manifest.get('_backend')}",
             f"{'':<14} {'seconds':>9} {'images/s':>9} {'x detect':>9}"]
    for label, seconds in [("detect alone", alone), *rows]:
        rate = images / seconds if seconds else float("inf")
        lines.append(f"{label:<14} {seconds:9.2f} {rate:9.1f} {rate / alone_rate:9.2f}")
    lines.append(f"{'stages summed':<14} {sum(s for _, s in rows):9.2f}")
    lines.append(f"{'build wall':<14} {wall:9.2f} {images / wall:9.1f} {images / wall / alone_rate:9.2f}")
    lines.append("codec calls in the build (per image), seconds, by the stage that asked:")
    for (who, what), calls in sorted(counter.calls.items()):
        lines.append(f"  {who:<10} {what:<7} {calls:6d} ({calls / images:4.1f}/image) {counter.seconds[who, what]:8.2f} s")
    return "\n".join(lines)


def profile_stages(inp: Path, config, images: int, top: int) -> str:
    """Where ingest's and crop's own time goes: cProfile of the stage functions on the first
    `images` photographs, outside the flow (functions by their own time)."""
    import cProfile
    import io
    import pstats

    from fundus_engine import crop as crop_stage
    from fundus_engine import detect as detect_stage
    from fundus_engine import ingest as ingest_stage
    from fundus_engine.evidence import DetectorEvidence

    sources, _ = ingest_stage.scan(inp)
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

    records, _ = profiled("ingest", lambda: ingest_stage.ingest(inp, sources, {}, config.ingest))
    detections, _ = detect_stage.detect(records, config.detect)
    evidence = DetectorEvidence.of(detect_stage.weights_path(config.detect), config.expand.negative_min_map50)
    with tempfile.TemporaryDirectory(prefix="fundus-crop-profile-") as tmp:
        profiled("crop", lambda: crop_stage.crop(records, detections, Path(tmp), config.crop, evidence))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="synthetic,real", help="comma-separated: synthetic, real")
    ap.add_argument("--images", type=int, default=256, help="synthetic images")
    ap.add_argument("--real", default=str(REAL), help="folder of real photographs (read in place)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for detect alone")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile ingest and crop on N images of each set (cProfile, outside the flow)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    logging.getLogger("prefect").setLevel(logging.WARNING)
    from prefect.testing.utilities import prefect_test_harness

    from fundus_engine import detect as detect_stage
    from fundus_engine.config import BuildConfig
    from fundus_engine.synth import generate

    config = BuildConfig()
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
            images, alone = detect_alone(inp, config, args.repeats)
            manifest, wall, write, counter = build_once(inp, tmp / f"out-{name}", config)
            manifest["_backend"] = f"{identity['backend']} on {identity['device']}"
            tables.append(table(label, manifest["images"], manifest, wall, write, images / alone, counter))
            if args.profile:
                tables.append(profile_stages(inp, config, args.profile, 8))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())

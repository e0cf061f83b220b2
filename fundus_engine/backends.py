"""Detect backends: the `.pt` weights run by PyTorch, or exported once by ultralytics (offline)
to ONNX (run by ONNX Runtime) or OpenVINO IR, and cached by content hash.

Where an export lives: beside the weights (`<stem>.<key>.onnx`, `<stem>.<key>_openvino_model/`),
or, when that folder is not writable (a site-packages install), under the user cache dir
(`$XDG_CACHE_HOME/fundus-engine/exports/`). `<key>` is 16 hex digits of a hash over the weights'
content and the export recipe (format, settings, ultralytics version), so retrained weights, a
changed recipe or another ultralytics get a fresh export and never a stale one. An export is
written under a temporary name in the same folder and renamed into place, so two processes
exporting at once both end with a whole export, and none ever loads half of one.

`auto` is the fastest backend this machine has for the device, as measured by
`bench/detect_throughput.py`: on CPU OpenVINO, else ONNX Runtime, else PyTorch; on a GPU, PyTorch.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from fundus_engine.user_cache import user_cache_dir

BACKENDS = ("torch", "onnx", "openvino")
CPU_PREFERENCE = ("openvino", "onnx", "torch")  # fastest first (bench/detect_throughput.py)
# What each backend needs importable to export and to run; the `onnx` extra installs both sets.
REQUIRES = {"torch": (), "onnx": ("onnx", "onnxruntime"), "openvino": ("openvino",)}
INSTALL_HINT = "pip install 'fundus-engine[onnx]'"
# The export recipe: dynamic batch and image size (on this 2-core CPU, static batch-16 and batch-1
# exports measured within the machine's noise of it; a dynamic graph letterboxes a non-square
# photograph to its own aspect, as PyTorch does, so boxes agree and fewer pixels are computed);
# float32 weights (fp16/int8 exports move boxes and confidences).
RECIPES = {
    "onnx": {"format": "onnx", "dynamic": True, "simplify": True, "half": False},
    "openvino": {"format": "openvino", "dynamic": True, "half": False, "int8": False},
}
_export_lock = threading.Lock()  # one export at a time per process (threads of one Prefect worker)


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available(backend: str) -> bool:
    return all(importable(m) for m in REQUIRES[backend])


def resolve_backend(backend: str, device: str) -> str:
    """The backend a config's `detect.backend` means on this machine and device."""
    if backend == "auto":
        if not device.startswith("cpu"):  # CUDA (or MPS): PyTorch runs there natively, in half precision
            return "torch"
        return next(b for b in CPU_PREFERENCE if available(b))
    if backend not in BACKENDS:
        raise ValueError(f"detect.backend {backend!r}: expected auto or one of {', '.join(BACKENDS)}")
    if not available(backend):
        missing = [m for m in REQUIRES[backend] if not importable(m)]
        raise RuntimeError(f"detect.backend {backend}: {', '.join(missing)} not installed ({INSTALL_HINT})")
    return backend


def export_key(weights_sha256: str, backend: str, imgsz: int) -> str:
    recipe = {**RECIPES[backend], "ultralytics": importlib.metadata.version("ultralytics")}
    if not recipe.get("dynamic"):
        recipe["imgsz"] = imgsz  # a static graph is bound to its export size
    return hashlib.sha256(f"{weights_sha256}\n{json.dumps(recipe, sort_keys=True)}".encode()).hexdigest()[:16]


def export_name(weights: Path, key: str, backend: str) -> str:
    return f"{weights.stem}.{key}.onnx" if backend == "onnx" else f"{weights.stem}.{key}_openvino_model"


def is_complete(path: Path, backend: str) -> bool:
    if backend == "onnx":
        return path.is_file() and path.stat().st_size > 0
    return (path / "metadata.yaml").is_file() and any(path.glob("*.xml")) and any(path.glob("*.bin"))


def version_file(path: Path) -> Path:
    """The file whose (mtime, size) stands for an export's version (an OpenVINO export is a folder)."""
    return path if path.is_file() else next(path.glob("*.bin"))


def model_file(weights: Path, backend: str, imgsz: int, weights_sha256: str) -> Path:
    """What ultralytics loads for `backend`: the `.pt` itself for torch, else the cached export,
    exported now if this machine has none yet (once; seconds)."""
    if backend == "torch":
        return weights
    name = export_name(weights, export_key(weights_sha256, backend, imgsz), backend)
    places = [weights.parent, user_cache_dir("exports")]
    for folder in places:
        if is_complete(folder / name, backend):
            return folder / name
    with _export_lock:
        for folder in places:  # another thread may have finished it while this one waited
            if is_complete(folder / name, backend):
                return folder / name
        for folder in places:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
            except OSError:  # not writable (read-only site-packages): the next place
                continue
            try:
                return _export_into(weights, backend, imgsz, scratch, folder / name)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    raise OSError(f"cannot write a {backend} export of {weights} in {' or '.join(map(str, places))}")


EXPORTS = {"count": 0}  # exports made by this process (tests check that a second load reuses one)


def _export_into(weights: Path, backend: str, imgsz: int, scratch: Path, target: Path) -> Path:
    from fundus_engine.yolo import ultralytics

    source = scratch / f"{weights.stem}.pt"  # ultralytics writes the export beside the file it loads
    shutil.copyfile(weights, source)
    made = Path(ultralytics().YOLO(str(source)).export(imgsz=imgsz, device="cpu", verbose=False, **RECIPES[backend]))
    EXPORTS["count"] += 1
    try:
        os.replace(made, target)  # atomic; a folder only replaces an absent or empty one
    except OSError:
        if not is_complete(target, backend):  # not another process's finished export: a real failure
            raise
    return target


# How OpenVINO runs on CPU (bench/detect_throughput.py measures the alternatives):
# hint: LATENCY (one stream, all cores on one request) or THROUGHPUT (a stream per core or two);
# precision: "f32", or None for the CPU plugin's default, which is bf16 on a CPU with AVX512-BF16
#   or AMX (this machine's): ~1.7x faster, but confidences move by up to 0.03 and boxes by up to
#   2.4 px, so boxes near the confidence threshold come and go (labels differed from PyTorch's on
#   19 of 256 synthetic images; f32: on none, boxes within 0.1 px);
# requests: parallel inference requests a batch is split over (one thread each; ultralytics sends
#   one synchronous request per batch).
OPENVINO_RUNTIME = {"hint": "LATENCY", "precision": "f32", "requests": 1}


def load(path: Path, imgsz: int, device: str):
    """An ultralytics model for `path` (.pt or an export). An export's predictor is set up here,
    on `device`, with one blank image, so that it runs with this module's runtime settings."""
    import numpy as np

    from fundus_engine.yolo import ultralytics

    model = ultralytics().YOLO(str(path), task="detect")
    if path.suffix != ".pt":
        with openvino_runtime():
            model.predict(np.zeros((imgsz, imgsz, 3), np.uint8), imgsz=imgsz, device=device, verbose=False)
    return model


@contextlib.contextmanager
def openvino_runtime():
    """While inside, ultralytics compiles OpenVINO models for CPU with `OPENVINO_RUNTIME` (for
    loads that ultralytics makes itself, as `model.val` does)."""
    try:
        from ultralytics.nn.backends.openvino import OpenVINOBackend
    except ImportError:  # an ultralytics without per-format backends: its own settings apply
        yield
        return
    original = OpenVINOBackend.load_model

    def load_model(self, weight):
        original(self, weight)
        if list(self.ov_compiled_model.get_property("EXECUTION_DEVICES")) == ["CPU"]:
            configure_openvino(self, Path(weight), **OPENVINO_RUNTIME)

    OpenVINOBackend.load_model = load_model
    try:
        yield
    finally:
        OpenVINOBackend.load_model = original


def configure_openvino(backend, path: Path, hint: str, precision: str | None, requests: int) -> None:
    """Recompile ultralytics' OpenVINO model with these settings; with several requests, a batch
    is split over them and they run at once (OpenVINO releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import openvino as ov

    core = ov.Core()
    xml = path if path.is_file() else next(path.glob("*.xml"))
    config = {"PERFORMANCE_HINT": hint}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(core.read_model(xml), "CPU", config)
    backend.ov_compiled_model = compiled
    if requests <= 1:
        return
    infer_requests = [compiled.create_infer_request() for _ in range(requests)]
    pool = ThreadPoolExecutor(requests, thread_name_prefix="openvino")

    def forward(im):
        x = im.cpu().numpy().astype(np.float32, copy=False)
        parts = np.array_split(x, min(requests, len(x)))
        done = list(pool.map(lambda rp: [v.copy() for v in rp[0].infer({0: rp[1]}).values()],
                             zip(infer_requests, parts)))
        return [np.concatenate(outs) for outs in zip(*done)]

    backend.forward = forward


def agreement(reference: list, other: list) -> dict:
    """How far one backend's detections are from another's on the same images: images whose
    labels differ (as multisets), and over the boxes paired per image and label (nearest first),
    the largest coordinate and confidence differences."""
    from collections import Counter, defaultdict

    def by(dets, key):
        groups = defaultdict(list)
        for d in dets:
            groups[key(d)].append(d)
        return groups

    ref_img, oth_img = by(reference, lambda d: d.sha256), by(other, lambda d: d.sha256)
    differ = [s for s in set(ref_img) | set(oth_img)
              if Counter(d.label for d in ref_img.get(s, [])) != Counter(d.label for d in oth_img.get(s, []))]
    worst_px = worst_conf = 0.0
    ref_group, oth_group = by(reference, lambda d: (d.sha256, d.label)), by(other, lambda d: (d.sha256, d.label))
    for key, mine in ref_group.items():
        theirs = list(oth_group.get(key, []))
        for d in sorted(mine, key=lambda d: -d.confidence):
            if not theirs:
                break
            near = min(theirs, key=lambda t: max(abs(a - b) for a, b in zip(d.xyxy, t.xyxy)))
            theirs.remove(near)
            worst_px = max(worst_px, max(abs(a - b) for a, b in zip(d.xyxy, near.xyxy)))
            worst_conf = max(worst_conf, abs(d.confidence - near.confidence))
    return {"images_with_other_labels": len(differ), "max_box_px": round(worst_px, 2),
            "max_confidence": round(worst_conf, 4)}

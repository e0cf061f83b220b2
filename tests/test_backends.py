"""Detect backends: exports agree with PyTorch, are made once and cached by content hash (beside
the weights, or in the user cache when that folder is read-only), and `auto` resolves to what the
machine has."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fundus_engine import backends
from fundus_engine import detect as detect_stage
from fundus_engine.config import DetectConfig, IngestConfig
from fundus_engine.detect import DEMO_WEIGHTS, detect
from fundus_engine.ingest import ingest
from fundus_engine.photo_files import SourceFile, sha256_file
from fundus_engine.synth import generate

EXPORTED = [b for b in ("onnx", "openvino") if backends.available(b)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A private copy of the demo weights: its exports are made fresh, in this test's folder."""
    folder = tmp_path_factory.mktemp("weights")
    shutil.copy(DEMO_WEIGHTS.with_suffix(".json"), folder / "demo.json")
    return Path(shutil.copy(DEMO_WEIGHTS, folder / "demo.pt"))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    truths = generate(root, 4, seed=2024)
    sources = [SourceFile(t.image, sha256_file(root / t.image)) for t in truths]
    found, rejects = ingest(root, sources, {}, IngestConfig())
    assert not rejects
    return found


@pytest.fixture(scope="module")
def detections(weights, records):
    """Each backend's detections on the same images, every class kept; exports made once here."""
    out = {}
    for backend in ["torch", *EXPORTED]:
        config = DetectConfig(weights=str(weights), backend=backend, device="cpu", ground_truth="ignore",
                              out_of_domain="keep")
        found, rejects = detect(records, config)
        assert not rejects
        out[backend] = found
    return out


@pytest.mark.parametrize("backend", EXPORTED)
def test_exported_backend_agrees_with_pytorch(detections, backend):
    torch_boxes, theirs = detections["torch"], detections[backend]
    assert len({d.sha256 for d in torch_boxes}) == 4 and len(torch_boxes) >= 8
    agreement = backends.agreement(torch_boxes, theirs)
    assert agreement["images_with_other_labels"] == 0, agreement
    assert agreement["max_box_px"] <= 2.0 and agreement["max_confidence"] <= 0.02, agreement
    assert sorted(d.label for d in torch_boxes) == sorted(d.label for d in theirs)


@pytest.mark.parametrize("backend", EXPORTED)
def test_export_is_cached_by_content_beside_the_weights(detections, weights, backend):
    key = backends.export_key(detect_stage.weights_sha256(weights), backend, 512)
    target = weights.parent / backends.export_name(weights, key, backend)
    assert backends.is_complete(target, backend)
    assert not [p for p in weights.parent.iterdir() if p.name.startswith(".")]  # no scratch left behind
    version = backends.version_file(target).stat().st_mtime_ns
    made = backends.EXPORTS["count"]
    detect_stage._load_model.cache_clear()  # a new process, as far as loading goes
    model = detect_stage.load_model(weights, backend, 512, "cpu")
    assert backends.EXPORTS["count"] == made  # loaded, not exported again
    assert backends.version_file(target).stat().st_mtime_ns == version
    assert list(model.names.values())[:3] == ["optic_disc", "optic_cup", "fovea"]  # class names travel


def test_export_key_follows_the_weights_content_and_recipe():
    a, b = "a" * 64, "b" * 64
    assert backends.export_key(a, "onnx", 512) == backends.export_key(a, "onnx", 640)  # dynamic: any size
    assert backends.export_key(a, "onnx", 512) != backends.export_key(b, "onnx", 512)
    assert backends.export_key(a, "onnx", 512) != backends.export_key(a, "openvino", 512)


def fake_export(weights, backend, imgsz, scratch, target):
    """Stands in for ultralytics' exporter (seconds) where only the caching is under test."""
    made = scratch / "made.onnx"
    made.write_bytes(b"onnx")
    backends.EXPORTS["count"] += 1
    os.replace(made, target)
    return target


def test_read_only_weights_folder_exports_to_the_user_cache(tmp_path, monkeypatch):
    site = tmp_path / "site-packages" / "fundus_engine" / "weights"
    site.mkdir(parents=True)
    weights = Path(shutil.copy(DEMO_WEIGHTS, site / "demo.pt"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_mkdtemp = backends.tempfile.mkdtemp

    def mkdtemp(prefix, dir):
        if Path(dir) == site:  # what a read-only install answers (root ignores permission bits)
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkdtemp(prefix=prefix, dir=dir)

    monkeypatch.setattr(backends.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(backends, "_export_into", fake_export)
    sha = detect_stage.weights_sha256(weights)
    first = backends.model_file(weights, "onnx", 512, sha)
    assert first.parent == tmp_path / "cache" / "fundus-engine" / "exports" and first.read_bytes() == b"onnx"
    made = backends.EXPORTS["count"]
    assert backends.model_file(weights, "onnx", 512, sha) == first and backends.EXPORTS["count"] == made
    assert list(site.iterdir()) == [weights]


def test_an_export_finished_by_another_process_is_taken_as_is(tmp_path, monkeypatch):
    """Two processes export at once: the loser's rename finds the winner's whole export in place."""
    weights = Path(shutil.copy(DEMO_WEIGHTS, tmp_path / "demo.pt"))
    target = tmp_path / backends.export_name(weights, "0" * 16, "openvino")
    target.mkdir()
    for name in ("demo.xml", "demo.bin", "metadata.yaml"):
        (target / name).write_text("winner")
    scratch = tmp_path / ".scratch"
    (scratch / "demo_openvino_model").mkdir(parents=True)
    (scratch / "demo_openvino_model" / "demo.xml").write_text("loser")

    class Exported:
        def export(self, **kwargs):
            return str(scratch / "demo_openvino_model")

    class Ultralytics:
        @staticmethod
        def YOLO(path):
            return Exported()

    monkeypatch.setattr("fundus_engine.yolo.ultralytics", lambda: Ultralytics)
    assert backends._export_into(weights, "openvino", 512, scratch, target) == target
    assert (target / "demo.xml").read_text() == "winner"


def test_auto_resolves_to_the_fastest_installed(monkeypatch):
    for installed, expected in [({"openvino", "onnx", "onnxruntime"}, "openvino"), ({"onnx", "onnxruntime"}, "onnx"),
                                ({"onnxruntime"}, "torch"), (set(), "torch")]:
        monkeypatch.setattr(backends, "importable", lambda m, installed=installed: m in installed)
        assert backends.resolve_backend("auto", "cpu") == expected
        assert backends.resolve_backend("auto", "cuda:0") == "torch"  # on a GPU, PyTorch in half precision
        assert detect_stage.cache_identity(DetectConfig(device="cpu")) == {"device": "cpu", "backend": expected}
    with pytest.raises(RuntimeError, match="onnxruntime"):
        backends.resolve_backend("onnx", "cpu")
    assert backends.resolve_backend("torch", "cpu") == "torch"


def test_onnx_weights_run_on_onnx_runtime(tmp_path):
    weights = tmp_path / "model.onnx"
    weights.write_bytes(b"")
    assert detect_stage.resolve_backend(DetectConfig(weights=str(weights), device="cpu")) == "onnx"
    with pytest.raises(ValueError, match="use the .pt weights"):
        detect_stage.resolve_backend(DetectConfig(weights=str(weights), device="cpu", backend="openvino"))

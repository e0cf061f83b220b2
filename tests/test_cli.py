"""The `fundus-engine` command as a user types it: synth -> build -> inspect."""
from __future__ import annotations

import json

import cv2
import pytest
from typer.testing import CliRunner

from fundus_engine.cli import app

runner = CliRunner()


def test_synth_build_inspect(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    result = runner.invoke(app, ["synth", "--n", "4", "--seed", "2", "--out", str(data), "--full-labels"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 images" in result.output
    labels = json.loads((data / "labels.json").read_text())["images"]
    assert len(labels) == 4 and all(entry["boxes"] for entry in labels)

    config = tmp_path / "build.yaml"
    config.write_text("shard_size: 2\nchain:\n  seed: 3\n")
    result = runner.invoke(app, ["build", "--input", str(data), "--out", str(out), "--config", str(config),
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == 4 and manifest["config"]["chain"]["seed"] == 3
    assert manifest["stages"]["ingest"]["shards"] == 2
    assert f"{manifest['records']} records from 4 images" in result.output
    # the labels name patients and no key is set: said in the log (and the console), the manifest and the card
    assert manifest["labels"]["patient_pseudonyms"] == "unkeyed"
    assert "patient pseudonyms are unkeyed digests" in (out / "logs" / "build.log").read_text()
    assert "unkeyed SHA-256 digests" in (out / "card" / "README.md").read_text()

    result = runner.invoke(app, ["inspect", str(out), "--stage", "crop", "--rows", "1", "--overlays", "2"])
    assert result.exit_code == 0, result.output
    overlays = sorted((out / "inspect").glob("*.overlay.jpg"))
    assert len(overlays) == 2
    assert cv2.imread(str(overlays[0])).shape == (512, 512, 3)
    # Ground-truth boxes were preferred over the detector, and inspect shows that source.
    assert '"source": "ground_truth"' in result.output

    # Reports stating an image's labelled findings, then negating them all: consistency 1/2.
    from fundus_engine.report_scoring import truth_findings
    from fundus_engine.models import ImageRecord
    from fundus_engine.tables import read_rows

    images = read_rows(sorted((out / "stages" / "ingest").glob("*.images.parquet")), ImageRecord)
    sha, truth = max(((i.sha256, truth_findings(i)) for i in images), key=lambda pair: len(pair[1]))
    assert len(truth) >= 2
    reports = tmp_path / "reports.jsonl"
    reports.write_text("\n".join(json.dumps({"sha256": sha, "report": text}) for text in (
        " ".join(f"{t.capitalize()} is seen." for t in sorted(truth)),
        " ".join(f"No {t}." for t in sorted(truth)))) + "\n")
    result = runner.invoke(app, ["score-reports", str(out), str(reports)])
    assert result.exit_code == 0, result.output
    assert f"consistency 0.500 ({len(truth)}/{2 * len(truth)}) over 2 reports" in result.output
    reports.write_text(json.dumps({"sha256": "0" * 64, "report": "Normal."}) + "\n")
    result = runner.invoke(app, ["score-reports", str(out), str(reports)])
    assert result.exit_code == 2 and "reports.jsonl:1" in result.output and "not an image of the build" in result.output


def test_build_reports_a_bad_config_file_by_name(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("detect:\n  confidence: 7\n")
    result = runner.invoke(app, ["build", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(config)])
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "confidence" in result.output


@pytest.mark.parametrize("name, text, reason", [
    ("broken.yaml", "detect: [unclosed\n", "cannot read the configuration"),
    ("broken.json", "{\"detect\": ", "cannot read the configuration"),
    ("list.yaml", "- detect\n- crop\n", "not a list"),
    ("absent.yaml", None, "No such file"),
])
@pytest.mark.parametrize("command", ["build", "train-detector"])
def test_an_unreadable_config_file_is_named_without_a_traceback(tmp_path, command, name, text, reason):
    config = tmp_path / name
    if text is not None:
        config.write_text(text)
    args = ["--input", str(tmp_path), "--out", str(tmp_path / "o")] if command == "build" else []
    result = runner.invoke(app, [command, *args, "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert name in result.output and reason in result.output, result.output


def test_inspect_without_a_build_says_so(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest" in result.output


def test_score_reports_accuracy_of_an_answers_file(tmp_path):
    from fundus_engine.mcq import write_benchmark
    from fundus_engine.models import BenchmarkQuestion

    questions = [BenchmarkQuestion(index=i, question="What is the marked part in this fundus image?",
                                   A="Optic disc", B="Fovea", C="Drusen", D="Haemorrhage", answer=letter,
                                   category=category, clinical_task="Organ Recognition", granularity="Box level",
                                   image_path=f"/x/{i}.jpg", sha256=f"{i:064x}")
                 for i, (letter, category) in enumerate([("A", "Optic disc"), ("B", "Fovea"), ("D", "Haemorrhage")])]
    bench = write_benchmark(questions, tmp_path / "test.parquet")
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"index": 0, "prediction": "A"}\n{"index": 1, "prediction": "(C)"}\n'
                       '{"index": 2, "prediction": "Haemorrhage"}\n')
    result = runner.invoke(app, ["score", str(bench), str(answers)])
    assert result.exit_code == 0, result.output
    assert "accuracy 0.667 (2/3)" in result.output
    bad = runner.invoke(app, ["score", str(bench), str(tmp_path / "answers.txt")])
    assert bad.exit_code == 2 and "answers.txt" in bad.output

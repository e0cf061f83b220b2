"""Secrets and patient identifiers stay out of what a build writes. An API key that a model server
echoes back (in an error body, after retries, or in a model's answer) is redacted before it
becomes a reject, a log line, a cached response or a result; a patient identifier is kept only
as a pseudonym."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fundus_engine.config import OpenAIConfig
from fundus_engine.expand import expand
from fundus_engine.expand_openai import OpenAIExpander
from fundus_engine.llm_ledger import CircuitOpen
from fundus_engine.models import Reject
from fundus_engine.tables import read_rows
from fundus_engine.testing.openai_server import FakeOpenAIServer
from fundus_engine.testing.shards import prepared_shard
from fundus_engine.write import write_rejects

KEY_ENV = "FUNDUS_REDACTION_TEST_KEY"
# One key shaped like OpenAI's, one opaque and short enough that only the exact-value rule
# (not the token shapes) can catch it when it is echoed without "Bearer".
KEYS = {"sk-shaped": "sk-proj-Xq7Lm2Vb9pR4tWz8Kc1Nd6Hf3Jg5", "opaque": "q7Hx2mVb9LpR4tWz"}
REDACTED = "[REDACTED]"
# what a build publishes (the working files under OUT/stages keep source paths)
PUBLISHED = ("dataset", "benchmark", "card", "manifest.json", "rejects.parquet", "exports")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return prepared_shard(tmp_path_factory.mktemp("redaction-input"), tmp_path_factory.mktemp("redaction-out"), 2,
                          seed=31, size=320)


@pytest.fixture(params=sorted(KEYS))
def secret(request, monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEYS[request.param])
    return KEYS[request.param]


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def expander_for(server, tmp_path, **overrides) -> OpenAIExpander:
    config = OpenAIConfig(**{"base_url": server.base_url, "model": "fake-fundus-vl", "api_key_env": KEY_ENV,
                             "max_retries": 1, "timeout": 5, "concurrency": 4, **overrides})
    return OpenAIExpander(config, cache_dir=tmp_path / "llm")


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


# --- the function ------------------------------------------------------------------------

def test_redact_secrets_replaces_the_configured_key_and_anything_shaped_like_a_token(monkeypatch):
    from fundus_engine.redaction import redact_secrets

    monkeypatch.setenv(KEY_ENV, "q7Hx2mVb9LpR4tWz")
    opaque = "upstream said: q7Hx2mVb9LpR4tWz is not allowed"
    assert redact_secrets(opaque, KEY_ENV) == "upstream said: [REDACTED] is not allowed"  # the exact value
    assert redact_secrets(opaque) == opaque  # no env var named, no known value: nothing token-shaped either
    cases = {
        "Incorrect API key provided: sk-proj-abc123DEF456ghi789. See docs.":
            "Incorrect API key provided: [REDACTED]. See docs.",
        "Incorrect API key provided: sk-fundu**********8a4f.": "Incorrect API key provided: [REDACTED].",
        "headers: Authorization: Bearer abc.DEF-123_x/y+z==, next": "headers: Authorization: Bearer [REDACTED], next",
        'api_key="0123456789abcdef0123456789abcdef"': 'api_key="[REDACTED]"',
        "token: dGhpcyBpcyBhIHNlY3JldCB0b2tlbjEyMw==": "token: [REDACTED]",
        "x-api-key provided 9f86d081884c7d659a2feaa0c55ad015": "x-api-key provided [REDACTED]",
    }
    for text, expected in cases.items():
        assert redact_secrets(text) == expected, text
        assert redact_secrets(expected) == expected  # idempotent
    clinical = ("Key finding: neovascularisation elsewhere with preretinal haemorrhage; token-shaped words such as "
                "pseudoexfoliation or photocoagulation and grades like R3A/M1 stay; the key is clinical judgement.")
    assert redact_secrets(clinical, KEY_ENV) == clinical
    assert redact_secrets(None, KEY_ENV) is None
    monkeypatch.setenv(KEY_ENV, "EMPTY")  # a local server's placeholder is no secret: text is not mangled
    assert redact_secrets("EMPTY fields", KEY_ENV) == "EMPTY fields"


# --- the expander against a server that echoes the key -------------------------------------

ECHOING_ERRORS = {  # id: (fault, params, status the reject names, requests per item)
    "401-json": ("unauthorized", {}, "401", 1),  # not retried
    "401-text": ("unauthorized", {"text_body": True}, "401", 1),
    "429-json-after-retries": ("rate_limit", {"echo_key": True, "retry_after": 0}, "429", 2),
    "500-text-after-retries": ("server_error", {"echo_key": True, "text_body": True}, "500", 2),
    "503-json-after-retries": ("unavailable", {"echo_key": True}, "503", 2),
}


@pytest.mark.parametrize("case", sorted(ECHOING_ERRORS))
def test_an_error_body_echoing_the_key_is_redacted_everywhere(shard, server, tmp_path, caplog, secret, case):
    fault, params, status, tries = ECHOING_ERRORS[case]
    records, anatomies, regions = shard
    caplog.set_level(logging.DEBUG)
    server.inject(fault, times=None, **params)
    expander = expander_for(server, tmp_path, circuit_breaker=1000)  # every request fails: all become rejects
    result = expand(expander, records[:1], anatomies, regions)
    n = 1 + sum(r.sha256 == records[0].sha256 for r in regions)
    assert len(result.rejects) == n and server.count(fault) == n * tries
    for reject in result.rejects:
        assert status in reject.reason and REDACTED in reject.reason, reject.reason  # the body was echoed...
        assert secret not in reject.reason and secret not in (reject.raw_output or "")  # ...and redacted
    out = tmp_path / "out"
    write_rejects(result.rejects, out)
    assert all(secret not in r.reason for r in read_rows(out / "rejects.parquet", Reject))
    assert secret not in expander.ledger.last_error and secret not in json.dumps(expander.ledger.snapshot())
    assert secret not in caplog.text
    assert files_holding(tmp_path, secret) == []


@pytest.mark.parametrize("fault, times", [("schema_violation", 2), ("truncated", 1)])
def test_a_raw_output_echoing_the_key_is_redacted_in_the_reject(shard, server, tmp_path, caplog, secret, fault, times):
    records, anatomies, regions = shard
    caplog.set_level(logging.DEBUG)
    server.inject(fault, times=times, match="Describe this fundus photograph", echo_key=True)
    result = expand(expander_for(server, tmp_path, concurrency=1), records[:1], anatomies, regions)
    (reject,) = result.rejects
    assert REDACTED in reject.raw_output and secret not in reject.raw_output and secret not in reject.reason
    write_rejects(result.rejects, tmp_path / "out")
    assert secret not in caplog.text
    assert files_holding(tmp_path, secret) == []  # rejects.parquet, and the response cache of the others


def test_an_answer_echoing_the_key_is_neither_cached_nor_kept(shard, server, tmp_path, caplog, secret):
    records, anatomies, regions = shard
    caplog.set_level(logging.DEBUG)
    server.inject("echo_key", times=None)
    result = expand(expander_for(server, tmp_path), records[:1], anatomies, regions)
    assert result.complete and len(result.expansions) == 1
    kept = json.dumps([e.model_dump(mode="json") for e in result.expansions])
    assert REDACTED in kept and secret not in kept
    cached = sorted((tmp_path / "llm").rglob("*.json"))
    assert cached and all(REDACTED in p.read_text() for p in cached)
    assert files_holding(tmp_path, secret) == [] and secret not in caplog.text


def test_the_circuit_breaker_message_carries_no_echoed_key(shard, server, tmp_path, caplog, secret):
    records, anatomies, regions = shard
    caplog.set_level(logging.DEBUG)
    server.inject("server_error", times=None, echo_key=True)
    expander = expander_for(server, tmp_path, max_retries=0, circuit_breaker=2, concurrency=1)
    with pytest.raises(CircuitOpen) as tripped:
        expand(expander, records, anatomies, regions)
    message = str(tripped.value)
    assert "last error" in message and REDACTED in message and secret not in message
    assert secret not in expander.ledger.last_error and secret not in caplog.text
    assert files_holding(tmp_path, secret) == []


def _build_with_record_numbers(source: Path, out: Path) -> tuple[dict, dict[str, str]]:
    """A build of 6 synthetic photographs of 3 patients whose labels name them by record number."""
    import time

    from fundus_engine.config import BuildConfig
    from fundus_engine.runner import RunContext, finish_build, plan_build
    from in_memory import run_local
    from fundus_engine.synth import generate

    if not source.exists():
        generate(source, 6, seed=3, size=256, full_labels=True)
    labels = json.loads((source / "labels.json").read_text())
    identifiers: dict[str, str] = {}
    for entry in labels["images"]:
        entry["patient_id"] = identifiers.setdefault(entry["patient_id"], f"MRN-{4821930 + len(identifiers)}")
    (source / "labels.json").write_text(json.dumps(labels))
    ctx = RunContext.create(source, out, BuildConfig(shard_size=2), run_id="pseudonyms")
    plan = plan_build(ctx)
    manifest = finish_build(ctx, plan, run_local(ctx, plan), time.monotonic())
    assert manifest["complete"] and len(set(identifiers.values())) == 3
    return manifest, identifiers


def _written_files_holding(out: Path, needles, under: tuple[str, ...] = ("",)) -> list[tuple[str, str]]:
    """(file, needle) for each needle found in a file written under OUT (or under the given names in it)."""
    import pyarrow.parquet as pq

    holding = []
    for path in sorted(f for name in under for f in ([out / name] if (out / name).is_file() else (out / name).rglob("*"))
                       if f.is_file()):
        text = (json.dumps(pq.read_table(path).to_pylist(), default=str) if path.suffix == ".parquet"
                else path.read_bytes().decode("latin-1"))
        holding += [(str(path.relative_to(out)), needle) for needle in needles if needle in text]
    return holding


def _patients_and_splits(out: Path) -> tuple[set[str], dict[str, set[str]]]:
    from fundus_engine.models import ImageRecord, InstructionRecord

    images = read_rows(sorted((out / "stages" / "ingest").glob("*.images.parquet")), ImageRecord)
    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    split_of = {r.sha256: r.split for r in records}
    splits = {p: {split_of[i.sha256] for i in images if i.patient_id == p} for p in {i.patient_id for i in images}}
    return set(splits), splits


def test_no_patient_identifier_reaches_the_output(tmp_path, monkeypatch):
    """Unkeyed, the labels' patient identifiers are kept only as plain digests
    (`labels.patient_pseudonym`): no file a build writes holds one, a patient's photographs
    still share a split, and the manifest says the pseudonyms are unkeyed."""
    from fundus_engine.labels import patient_pseudonym

    monkeypatch.delenv("FUNDUS_ENGINE_PATIENT_KEY", raising=False)
    manifest, identifiers = _build_with_record_numbers(tmp_path / "in", tmp_path / "out")
    assert _written_files_holding(tmp_path / "out", identifiers.values()) == []
    patients, splits = _patients_and_splits(tmp_path / "out")
    assert patients == {patient_pseudonym(mrn) for mrn in identifiers.values()}
    assert all(len(s) == 1 for s in splits.values())
    assert manifest["labels"]["patient_pseudonyms"] == "unkeyed"
    assert "unkeyed SHA-256 digests" in (tmp_path / "out" / "card" / "README.md").read_text()


def test_a_patient_key_keys_the_pseudonyms_and_is_never_written(tmp_path, monkeypatch):
    """With a secret in FUNDUS_ENGINE_PATIENT_KEY the pseudonyms are HMACs of it: a record number
    can no longer be confirmed by hashing candidates. Neither the key nor an identifier reaches a
    file; the manifest names the key by an id that reveals nothing of it; the same key gives the
    same pseudonyms and reuses every stage (a trailing newline is not part of it), another key
    recomputes from ingest."""
    from fundus_engine.labels import patient_key_id, patient_pseudonym

    source = tmp_path / "in"
    key, other = "k3y-for-test-7Hq2Lm9Vb4", "another-secret-x81Pw3Zt"
    monkeypatch.setenv("FUNDUS_ENGINE_PATIENT_KEY", key)
    manifest, identifiers = _build_with_record_numbers(source, tmp_path / "out")
    patients, splits = _patients_and_splits(tmp_path / "out")
    assert patients == {patient_pseudonym(mrn, key.encode()) for mrn in identifiers.values()}
    assert all(p.startswith("pk-") for p in patients) and all(len(s) == 1 for s in splits.values())
    assert manifest["labels"]["patient_pseudonyms"] == f"keyed {patient_key_id(key.encode())}"
    assert f"keyed pseudonyms (HMAC-SHA256 with a secret key, key id `{patient_key_id(key.encode())}`)" in \
        (tmp_path / "out" / "card" / "README.md").read_text()
    assert _written_files_holding(tmp_path / "out", [key, *identifiers.values()]) == []

    monkeypatch.setenv("FUNDUS_ENGINE_PATIENT_KEY", key + "\n")  # as read from a file: the same key
    again, _ = _build_with_record_numbers(source, tmp_path / "out")
    assert all(s["computed"] == 0 for s in again["stages"].values())
    monkeypatch.setenv("FUNDUS_ENGINE_PATIENT_KEY", other)
    rekeyed, _ = _build_with_record_numbers(source, tmp_path / "out")
    assert rekeyed["stages"]["ingest"]["computed"] == rekeyed["stages"]["ingest"]["shards"] == 3
    assert _patients_and_splits(tmp_path / "out")[0] == {patient_pseudonym(m, other.encode()) for m in identifiers.values()}
    assert rekeyed["labels"]["patient_pseudonyms"] != manifest["labels"]["patient_pseudonyms"]


def test_a_short_patient_key_stops_the_build_without_showing_it(tmp_path, monkeypatch):
    from fundus_engine.config import BuildConfig
    from fundus_engine.runner import RunContext, plan_build
    from fundus_engine.synth import generate

    generate(tmp_path / "in", 2, seed=3, size=256, full_labels=True)
    monkeypatch.setenv("FUNDUS_ENGINE_PATIENT_KEY", "hunter2")
    with pytest.raises(ValueError) as raised:
        plan_build(RunContext.create(tmp_path / "in", tmp_path / "out", BuildConfig(), run_id="short-key"))
    assert "FUNDUS_ENGINE_PATIENT_KEY" in str(raised.value) and "at least 16 characters" in str(raised.value)
    assert "hunter2" not in str(raised.value)

    from typer.testing import CliRunner

    from fundus_engine.cli import app

    result = CliRunner().invoke(app, ["build", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "FUNDUS_ENGINE_PATIENT_KEY" in result.output  # before any flow starts
    assert "hunter2" not in result.output and not (tmp_path / "out").exists()


def test_file_names_carrying_identifiers_stay_out_of_the_published_outputs(tmp_path):
    """Hospital exports often name photographs by record number: with `write.image_paths: content`
    the dataset, benchmark, card, manifest and exports name hash-named copies under OUT/images,
    which hold the same bytes, and no source file name."""
    import time

    from fundus_engine.config import BuildConfig, WriteConfig
    from fundus_engine.export import export_all
    from fundus_engine.models import InstructionRecord
    from fundus_engine.photo_files import sha256_file
    from fundus_engine.runner import RunContext, finish_build, plan_build
    from fundus_engine.synth import generate
    from in_memory import run_local

    source, out = tmp_path / "in", tmp_path / "out"
    generate(source, 8, seed=5, size=256, full_labels=True)
    labels = json.loads((source / "labels.json").read_text())
    names = []
    for n, entry in enumerate(labels["images"]):
        old = source / entry["image"]
        entry["image"] = f"images/MRN-{5530120 + n}_OD_1961-04-0{n + 1}.jpg"
        old.rename(source / entry["image"])
        names.append(f"MRN-{5530120 + n}")
    (source / "labels.json").write_text(json.dumps(labels))
    config = BuildConfig(shard_size=4, write=WriteConfig(image_paths="content", test_fraction=0.5))
    ctx = RunContext.create(source, out, config, run_id="file-names")
    plan = plan_build(ctx)
    manifest = finish_build(ctx, plan, run_local(ctx, plan), time.monotonic())
    assert manifest["complete"] and manifest["benchmark"]["questions"] > 0
    export_all(out)

    assert _written_files_holding(out, names, PUBLISHED) == []

    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    shown = {Path(r.source_image_path) for r in records}
    assert {p.parent for p in shown} == {out / "images"} and len(shown) == 8
    for path in shown:  # the same photograph, named by its content
        assert path.name == f"{sha256_file(path)}.jpg"
    assert all(Path(r.image_path).parent == out / "images" or Path(r.image_path).is_relative_to(out)
               for r in records)
    # the default keeps the source paths (the build's own folders under `stages` always do)
    default = RunContext.create(source, tmp_path / "default", BuildConfig(shard_size=4), run_id="file-names-default")
    plan = plan_build(default)
    finish_build(default, plan, run_local(default, plan), time.monotonic())
    records = read_rows(sorted((tmp_path / "default" / "dataset").glob("*.parquet")), InstructionRecord)
    assert {Path(r.source_image_path).name[:11] for r in records} == set(names)


def test_identifier_in_path_finds_an_identifier_as_whole_words():
    from fundus_engine.labels import identifier_in_path, patient_pseudonym

    key = b"k3y-for-test-7Hq2Lm9Vb4"
    assert identifier_in_path("/data/EyePACS/10_left.jpeg", patient_pseudonym("10"))
    assert identifier_in_path("/exports/MRN-5530120/OD.jpg", patient_pseudonym("MRN-5530120", key), key)
    assert identifier_in_path("/exports/MRN-5530120_OD.jpg", patient_pseudonym("5530120"))
    assert not identifier_in_path("/exports/MRN-5530120/OD.jpg", patient_pseudonym("MRN-5530120"), key)  # other key
    assert not identifier_in_path("/data/P101_left.jpeg", patient_pseudonym("10"))  # not a word of its own
    assert not identifier_in_path("/data/10_left.jpeg", patient_pseudonym("1"))


def test_photographs_filed_under_their_patient_s_identifier_are_published_by_content_by_default(tmp_path):
    """EyePACS-style `<patient>_<side>.jpg`, the patient as labels.json gives it: by default
    (`write.image_paths: auto`) the dataset, benchmark, card and exports name hash-named copies, and
    the manifest and card say why; with `source` the records name the files and the card warns."""
    import time

    from fundus_engine.config import BuildConfig, WriteConfig
    from fundus_engine.export import export_all
    from fundus_engine.models import InstructionRecord
    from fundus_engine.runner import RunContext, finish_build, plan_build
    from fundus_engine.synth import generate
    from in_memory import run_local

    source = tmp_path / "in"
    generate(source, 6, seed=3, size=256, full_labels=True)
    labels = json.loads((source / "labels.json").read_text())
    names = []
    for n, entry in enumerate(labels["images"]):
        entry["patient_id"] = str(7304100 + n // 2)  # two photographs a patient, filed under the number
        old = source / entry["image"]
        entry["image"] = f"images/{entry['patient_id']}_{'right' if entry['laterality'] == 'OD' else 'left'}.jpg"
        old.rename(source / entry["image"])
        names.append(Path(entry["image"]).stem)
    (source / "labels.json").write_text(json.dumps(labels))

    def build(out: Path, write: WriteConfig) -> tuple[dict, list[InstructionRecord]]:
        ctx = RunContext.create(source, out, BuildConfig(shard_size=3, write=write), run_id="filed-by-patient")
        plan = plan_build(ctx)
        manifest = finish_build(ctx, plan, run_local(ctx, plan), time.monotonic())
        return manifest, read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)

    out = tmp_path / "out"
    manifest, records = build(out, WriteConfig(test_fraction=0.5))
    assert manifest["labels"]["identifiers_in_paths"] == 6 and manifest["image_paths"] == "content"
    assert {Path(r.source_image_path).parent for r in records} == {out / "images"}
    assert "(6 of their file paths held the patient's identifier)" in (out / "card" / "README.md").read_text()
    export_all(out)
    assert _written_files_holding(out, names, PUBLISHED) == []

    manifest, records = build(tmp_path / "source", WriteConfig(test_fraction=0.5, image_paths="source"))
    assert manifest["labels"]["identifiers_in_paths"] == 6 and manifest["image_paths"] == "source"
    assert {Path(r.source_image_path).stem for r in records} == set(names)
    assert "**Warning:** 6 photographs' file paths" in (tmp_path / "source" / "card" / "README.md").read_text()

"""The openai expand backend against a real OpenAI-compatible HTTP server on loopback, with the
official client over real HTTP: structured output, format fallback, repair, every injected
fault, the circuit breaker, the budget, the response cache and the consistency flags."""
from __future__ import annotations

import json
import shutil
import time

import pytest

from fundus_engine.config import OpenAIConfig, Prices
from fundus_engine.expand import expand
from fundus_engine.expand_openai import OpenAIExpander
from fundus_engine.llm_client import parse_output
from fundus_engine.llm_consistency import mentioned
from fundus_engine.llm_ledger import CircuitOpen
from fundus_engine.models import RegionFindings
from fundus_engine.prompts import PROMPTS_DIR, load
from fundus_engine.testing.openai_server import FakeOpenAIServer
from fundus_engine.testing.shards import prepared_shard

REGION_PROMPT_TEXT = "close-up of the region"  # appears only in region requests


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """Four synthetic images through ingest, detect (ground-truth boxes) and crop."""
    return prepared_shard(tmp_path_factory.mktemp("openai-input"), tmp_path_factory.mktemp("openai-out"), 4, seed=77,
                          size=384)


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def expander_for(server, tmp_path, prompts_dir=None, **overrides) -> OpenAIExpander:
    config = OpenAIConfig(**{"base_url": server.base_url, "model": "fake-fundus-vl", "max_retries": 2, "timeout": 5,
                             "concurrency": 4, **overrides})
    return OpenAIExpander(config, prompts_dir, cache_dir=tmp_path / "llm")


def n_requests(shard) -> int:
    records, _, regions = shard
    return len(records) + len(regions)


def test_structured_answers_for_every_image_and_region(shard, server, tmp_path):
    records, anatomies, regions = shard
    result = expand(expander_for(server, tmp_path, image_max_side=256), records, anatomies, regions)
    assert result.complete and not result.rejects
    assert len(result.expansions) == 4
    assert sum(len(e.regions) for e in result.expansions) == len(regions)
    assert server.count("ok") == n_requests(shard) == result.usage["requests"]
    assert {r.response_format for r in server.requests} == {"json_schema"}
    full_views = [r.image_sizes[0] for r in server.requests if len(r.image_sizes) == 1]
    assert full_views and all(max(size) == 256 for size in full_views)  # resized before sending
    assert all(len(r.image_sizes) == 2 for r in server.requests if REGION_PROMPT_TEXT in r.text)  # crop + marked
    e = result.expansions[0]
    assert e.provenance.backend == "openai" and e.provenance.model == "fake-fundus-vl"
    assert e.provenance.prompt_id == "expand.openai_image" and len(e.provenance.prompt_sha256) == 64
    assert e.provenance.region_prompt_id == "expand.openai_region"
    assert e.provenance.region_prompt_sha256 == load("expand/openai_region").sha256
    record = next(r for r in records if r.sha256 == e.sha256)
    assert e.image.diagnosis == record.diagnosis and e.image.diagnosis_source == "label"
    assert result.usage["prompt_tokens"] > 0 and result.usage["http_status"] == {"200": n_requests(shard)}


def test_steps_down_to_json_mode_when_the_server_lacks_json_schema(shard, tmp_path):
    records, anatomies, regions = shard
    with FakeOpenAIServer(supports_json_schema=False) as srv:
        expander = expander_for(srv, tmp_path, concurrency=1)
        result = expand(expander, records, anatomies, regions)
        assert result.complete and len(result.expansions) == 4
        assert expander.ledger.response_format == "json_object"
        assert srv.count("bad_request") == 1 and srv.count("ok") == n_requests(shard)


def test_text_mode_answers_are_parsed_from_prose(shard, server, tmp_path):
    records, anatomies, regions = shard
    result = expand(expander_for(server, tmp_path, response_format="text"), records[:1], anatomies, regions)
    assert result.complete and len(result.expansions) == 1
    assert {r.response_format for r in server.requests} == {None}


@pytest.mark.parametrize("fault, params, status", [
    ("rate_limit", {"retry_after": 1}, "429"),
    ("server_error", {}, "500"),
    ("unavailable", {}, "503"),
    ("drop", {}, None),
    ("timeout", {"seconds": 3}, None),
])
def test_transient_faults_are_retried_and_nothing_is_lost(shard, server, tmp_path, fault, params, status):
    records, anatomies, regions = shard
    server.inject(fault, times=2, **params)
    started = time.monotonic()
    result = expand(expander_for(server, tmp_path, timeout=1.0), records, anatomies, regions)
    assert result.complete and not result.rejects and len(result.expansions) == 4
    assert server.count(fault) == 2 and server.count("ok") == n_requests(shard)
    if status:
        assert result.usage["http_status"][status] == 2
    if fault == "rate_limit":
        assert time.monotonic() - started >= 1.0  # Retry-After honoured


def test_malformed_json_is_repaired_with_one_more_request(shard, server, tmp_path):
    records, anatomies, regions = shard
    server.inject("malformed_json", times=1)
    result = expand(expander_for(server, tmp_path, concurrency=1), records, anatomies, regions)
    assert result.complete and len(result.expansions) == 4
    assert result.usage["repairs"] == 1 and result.usage["requests"] == n_requests(shard) + 1
    repair = server.requests[1]
    assert "not valid" in repair.text


def test_an_answer_cut_off_at_max_tokens_is_rejected_with_the_fix_not_repaired(shard, server, tmp_path):
    records, anatomies, regions = shard
    target = regions[0]
    server.inject("truncated", times=1, match=f'<facts>{{"box_0_999": {json.dumps(target.box_999)}')
    result = expand(expander_for(server, tmp_path, concurrency=1), records, anatomies, regions)
    (reject,) = result.rejects
    assert reject.item == target.region_id and "cut off at max_tokens" in reject.reason
    assert "expand.openai.max_tokens" in reject.reason and reject.raw_output
    assert result.usage["repairs"] == 0 and server.count() == n_requests(shard)  # no repair spent on it


def test_an_answer_still_invalid_after_repair_is_rejected_with_its_raw_output(shard, server, tmp_path):
    records, anatomies, regions = shard
    target = regions[0]
    # the region's own request: its facts (keys sorted by tojson) open with its box
    server.inject("schema_violation", times=2, match=f'<facts>{{"box_0_999": {json.dumps(target.box_999)}')
    result = expand(expander_for(server, tmp_path, concurrency=1), records, anatomies, regions)
    assert not result.complete
    assert [r.item for r in result.rejects] == [target.region_id]
    reject = result.rejects[0]
    assert "invalid RegionFindings after one repair" in reject.reason and "description" in reject.reason
    assert reject.raw_output and "unexpected" in reject.raw_output
    # the image is still described, without that one region
    e = next(e for e in result.expansions if e.sha256 == target.sha256)
    assert target.region_id not in {d.region_id for d in e.regions}
    assert len(result.expansions) == 4


def test_contradictions_are_flagged(shard, server, tmp_path):
    records, anatomies, regions = shard
    clean = next(r for r in records if not {x.label for x in regions if x.sha256 == r.sha256} & {"neovascularisation"})
    server.inject("contradiction", times=1, match="Describe this fundus photograph")
    expander = expander_for(server, tmp_path, concurrency=1)
    result = expand(expander, [clean], anatomies, regions)
    flags = result.expansions[0].flags
    assert "unsupported_lesion:neovascularisation" in flags
    assert any(f.startswith("laterality:") for f in flags)


def test_consistency_rules():
    assert mentioned("Two haemorrhages in the superotemporal arcade", "haemorrhage")
    assert not mentioned("There is no haemorrhage; drusen are absent", "haemorrhage")
    assert not mentioned("No new vessels or haemorrhages", "neovascularisation")
    assert mentioned("No drusen. Cotton-wool spots near the disc", "soft_exudate")
    # How a model words a normal eye's evidence: lists after one negation, and negations after the noun.
    normal = "No microaneurysms, haemorrhages or hard exudates are visible. Drusen are not seen."
    assert not any(mentioned(normal, label) for label in ("microaneurysm", "haemorrhage", "hard_exudate", "drusen"))
    assert not mentioned("absence of drusen, exudates and haemorrhages", "haemorrhage")
    assert mentioned("Scattered haemorrhages, but no exudates", "haemorrhage")
    assert not mentioned("Scattered haemorrhages, but no exudates", "hard_exudate")
    answer = parse_output('Sure!\n```json\n{"description": "a dot", "significance": "early DR"}\n```', RegionFindings)
    assert answer.description == "a dot"
    with pytest.raises(ValueError, match="significance"):
        parse_output('{"description": "a dot"}', RegionFindings)


def test_circuit_breaker_stops_with_a_clear_error(shard, server, tmp_path):
    records, anatomies, regions = shard
    server.inject("server_error", times=None)
    expander = expander_for(server, tmp_path, max_retries=0, circuit_breaker=3, concurrency=2)
    with pytest.raises(CircuitOpen, match=r"circuit breaker open: [34] consecutive failed requests to "
                                          r"http://127\.0\.0\.1:\d+/v1 \(model fake-fundus-vl\); last error: .*500"):
        expand(expander, records, anatomies, regions)
    assert server.count("server_error") <= 3 + 1  # the breaker plus what was already in flight, not everything
    with pytest.raises(CircuitOpen):  # and stays open for the rest of the run
        expand(expander, records, anatomies, regions)


def test_budget_stops_before_max_cost_is_exceeded(shard, server, tmp_path):
    records, anatomies, regions = shard
    prices = Prices(input_per_million=100.0, output_per_million=400.0)
    probe = expand(expander_for(server, tmp_path / "probe", prices=prices), records[:1], anatomies, regions)
    per_request = probe.usage["cost_usd"] / probe.usage["requests"]
    server.reset()
    max_cost = per_request * 6
    result = expand(expander_for(server, tmp_path, prices=prices, max_cost=max_cost, concurrency=1),
                    records, anatomies, regions)
    assert not result.complete
    assert 0 < result.usage["cost_usd"] <= max_cost
    assert result.usage["not_sent_budget"] == n_requests(shard) - result.usage["requests"] > 0
    assert all("max_cost" in r.reason for r in result.rejects)
    assert server.count() == result.usage["requests"]


def test_budget_holds_under_concurrency_when_the_server_bills_images_heavily(shard, server, tmp_path):
    """OpenAI bills a 1024-px image at ~25k tokens; the estimate cannot know that until the first
    answer, so under a budget one request goes first and calibrates the rest."""
    records, anatomies, regions = shard
    server.tokens_per_image = 25_000
    prices = Prices(input_per_million=0.15, output_per_million=0.6)
    probe = expand(expander_for(server, tmp_path / "probe", prices=prices), records[:1], anatomies, regions)
    per_request = probe.usage["cost_usd"] / probe.usage["requests"]
    server.reset()
    server.tokens_per_image = 25_000
    max_cost = per_request * 5
    result = expand(expander_for(server, tmp_path, prices=prices, max_cost=max_cost, concurrency=8),
                    records, anatomies, regions)
    assert 0 < result.usage["cost_usd"] <= max_cost
    assert result.usage["requests"] >= 2 and result.usage["not_sent_budget"] > 0
    assert server.count() == result.usage["requests"]


def test_a_server_that_reports_no_usage_is_charged_its_estimate(shard, server, tmp_path):
    records, anatomies, regions = shard
    server.report_usage = False
    prices = Prices(input_per_million=100.0, output_per_million=400.0)
    free = expand(expander_for(server, tmp_path / "free", prices=prices), records[:1], anatomies, regions)
    assert free.usage["requests"] == free.usage["usage_missing"] == server.count() > 0
    assert free.usage["cost_usd"] > 0  # estimated, not zero: otherwise max_cost would never bind
    per_request = free.usage["cost_usd"] / free.usage["requests"]
    server.reset()
    server.report_usage = False
    limited = expand(expander_for(server, tmp_path, prices=prices, max_cost=per_request * 3, concurrency=4),
                     records, anatomies, regions)
    assert 0 < limited.usage["cost_usd"] <= per_request * 3 + 1e-12
    assert limited.usage["not_sent_budget"] > 0 and server.count() == limited.usage["requests"]


def test_cache_makes_a_rerun_free_and_a_prompt_edit_recalls_only_its_requests(shard, server, tmp_path):
    records, anatomies, regions = shard
    first = expand(expander_for(server, tmp_path), records, anatomies, regions)
    assert first.usage["requests"] == n_requests(shard)
    again = expand(expander_for(server, tmp_path), records, anatomies, regions)
    assert again.usage["requests"] == 0 and again.usage["cache_hits"] == n_requests(shard)
    assert [e.model_dump() for e in again.expansions] == [e.model_dump() for e in first.expansions]

    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts)
    region_prompt = prompts / "expand" / "openai_region.j2"
    region_prompt.write_text(region_prompt.read_text().replace("Describe its colour", "Describe its colour, border"))
    edited = expand(expander_for(server, tmp_path, prompts), records, anatomies, regions)
    assert edited.usage["requests"] == len(regions) and edited.usage["cache_hits"] == len(records)

    fresh = expand(expander_for(server, tmp_path, cache=False), records, anatomies, regions)
    assert fresh.usage["requests"] == n_requests(shard)  # --no-cache sends everything again


def test_server_urls_lose_their_credentials_before_they_are_written():
    from fundus_engine.redaction import redact_url

    assert redact_url("https://user:sk-secret@llm.example.org:8443/v1?api-key=sk-secret") == \
        "https://llm.example.org:8443/v1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_a_request_that_keeps_failing_is_rejected_and_the_rest_go_on(shard, server, tmp_path):
    records, anatomies, regions = shard
    target = regions[0]
    server.inject("unavailable", times=3, match=f'<facts>{{"box_0_999": {json.dumps(target.box_999)}')
    result = expand(expander_for(server, tmp_path, concurrency=1), records, anatomies, regions)  # 1 try + 2 retries
    assert not result.complete and [r.item for r in result.rejects] == [target.region_id]
    assert "request failed after 2 retries" in result.rejects[0].reason and "503" in result.rejects[0].reason
    assert len(result.expansions) == 4 and result.usage["http_status"]["503"] == 3
    assert sum(len(e.regions) for e in result.expansions) == len(regions) - 1


def test_a_file_rewritten_in_place_is_not_served_from_the_in_process_caches(tmp_path):
    """Crops are rewritten at the same path when crop.context changes; the data URL and hash sent
    (and so the response-cache key) must follow the new pixels."""
    import os

    import cv2
    import numpy as np

    from fundus_engine.llm_client import image_data_url
    from fundus_engine.photo_files import cached_sha256

    path = tmp_path / "r-000.crop.jpg"
    cv2.imwrite(str(path), np.full((32, 32, 3), 40, np.uint8))
    first = (image_data_url(str(path), 64), cached_sha256(path))
    cv2.imwrite(str(path), np.full((32, 32, 3), 200, np.uint8))
    os.utime(path, ns=(1, 1))  # a distinct version even on a coarse-grained clock
    second = (image_data_url(str(path), 64), cached_sha256(path))
    assert first[0] != second[0] and first[1] != second[1]


def test_a_foreign_cache_file_is_a_miss_not_a_crash(shard, server, tmp_path):
    records, anatomies, regions = shard
    first = expand(expander_for(server, tmp_path), records[:1], anatomies, regions)
    files = sorted((tmp_path / "llm").rglob("*.json"))
    assert len(files) == first.usage["requests"] > 1
    files[0].write_text('{"foo": 1}')  # valid JSON, not an answer
    files[1].write_text('{"parsed": {"unexpected": true}}')  # an answer that no longer fits the model
    server.reset()
    again = expand(expander_for(server, tmp_path), records[:1], anatomies, regions)
    assert again.rejects == [] and again.usage["requests"] == 2 == server.count()
    assert again.usage["cache_hits"] == first.usage["requests"] - 2


def test_a_base_url_with_credentials_is_refused_without_echoing_them():
    """The config is a Prefect flow parameter, stored and shown by the server: no key may ride in it."""
    from pydantic import ValidationError

    for url in ("https://user:sk-secret-1@llm.example.org/v1", "https://llm.example.org/v1?api-key=sk-secret-1",
                "https://llm.example.org/v1?x-api-key=sk-secret-1", "https://llm.example.org/v1?auth=sk-secret-1",
                "https://llm.example.org/v1?password=sk-secret-1", "https://llm.example.org/v1?sig=sk-secret-1",
                "https://llm.example.org/v1?api-version=1&access_token=sk-secret-1",
                "https://llm.example.org/v1?key"):
        with pytest.raises(ValidationError, match="api_key_env") as refused:
            OpenAIConfig(base_url=url)
        assert "sk-secret-1" not in str(refused.value)
    azure = "https://x.openai.azure.com/openai/deployments/gpt?api-version=2024-06-01"
    assert OpenAIConfig(base_url=azure).base_url == azure  # a version parameter is no secret
    served = "http://127.0.0.1:8000/v1?model=llava-med&region=eu"
    assert OpenAIConfig(base_url=served).base_url == served

"""The loopback OpenAI server, exercised through the official `openai` client over real HTTP."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import urllib.request
from enum import Enum
from typing import Literal, Optional

import openai
import pytest
from PIL import Image
from pydantic import BaseModel, ValidationError

from fundus_engine.testing.openai_server import MODEL_ID, FakeOpenAIServer, serve_in_subprocess

CLAIM = "neovascularisation at the optic disc"


class Severity(str, Enum):
    none = "none"
    mild = "mild"
    severe = "severe"


class Lesion(BaseModel):
    kind: str
    count: int
    confidence: float


class Finding(BaseModel):
    laterality: Literal["OD", "OS"]
    severity: Severity
    lesions: list[Lesion]
    findings: list[str]
    image_quality: Optional[str]
    referable: bool


SCHEMA = {"type": "json_schema",
          "json_schema": {"name": "finding", "schema": Finding.model_json_schema(), "strict": True}}


def data_url(fmt: str, size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 40, 20)).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def messages(facts: dict | None = None, text: str = "Describe this fundus photograph.", images=()) -> list:
    prompt = text + (f"\n<facts>{json.dumps(facts)}</facts>" if facts is not None else "")
    parts = [{"type": "text", "text": prompt}] + [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "system", "content": "You are a retina specialist."}, {"role": "user", "content": parts}]


def ask(client: openai.OpenAI, response_format: dict | None = SCHEMA, **kw) -> str:
    extra = {"response_format": response_format} if response_format else {}
    resp = client.chat.completions.create(model=MODEL_ID, messages=messages(**kw), **extra)
    return resp.choices[0].message.content


@pytest.fixture
def srv():
    with FakeOpenAIServer() as s:
        yield s


def client_for(srv, max_retries: int = 2, timeout: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=max_retries, timeout=timeout)


def test_json_schema_answer_validates_and_takes_facts(srv):
    facts = {"laterality": "OS", "severity": "mild", "findings": ["drusen"], "count": 3, "referable": "no"}
    with client_for(srv) as client:
        resp = client.chat.completions.create(model="my-model", messages=messages(facts), response_format=SCHEMA)
        again = ask(client, facts=facts)
        assert client.models.list().data[0].id == MODEL_ID
    content = resp.choices[0].message.content
    finding = Finding.model_validate_json(content)
    assert (finding.laterality, finding.severity, finding.findings) == ("OS", Severity.mild, ["drusen"])
    assert finding.referable is False  # "no" is not a boolean: filler instead
    assert len(finding.lesions) == 1 and finding.lesions[0].count == 3 and finding.lesions[0].confidence == 0.0
    tag = finding.lesions[0].kind.split()[1]
    assert finding.lesions[0].kind == f"kind {tag}" and finding.image_quality == f"image_quality {tag}"
    assert len(tag) == 8 and again == content  # deterministic
    assert resp.model == "my-model" and resp.object == "chat.completion"
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].message.role == "assistant"
    chars = sum(len(p) for p in ["You are a retina specialist.", messages(facts)[1]["content"][0]["text"]])
    assert resp.usage.prompt_tokens == chars // 4
    assert resp.usage.completion_tokens == len(content) // 4 + 1
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    rec = srv.requests[0]
    assert (rec.model, rec.response_format, rec.authorization, rec.outcome, rec.status) == \
        ("my-model", "json_schema", "Bearer sk-test", "ok", 200)
    assert "<facts>" in rec.text and srv.count("ok") == 2


def test_parse_helper_with_strict_pydantic_schema(srv):
    with client_for(srv) as client:
        resp = client.chat.completions.parse(model=MODEL_ID, messages=messages({"laterality": "OD"}),
                                             response_format=Finding)
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, Finding) and parsed.laterality == "OD" and parsed.severity is Severity.none


def test_json_object_and_text_modes(srv):
    facts = {"laterality": "OD", "cup_disc_ratio": 0.4}
    with client_for(srv) as client:
        assert json.loads(ask(client, {"type": "json_object"}, facts=facts)) == facts
        assert json.loads(ask(client, {"type": "json_object"})) == {"note": "no schema"}
        text = ask(client, {"type": "text"}, facts=facts)
        assert ask(client, None, facts=facts) == text
    assert text.startswith("Here is the structured description.\n```json\n") and text.endswith("\n```")
    assert json.loads(text.split("```json\n")[1].rsplit("```", 1)[0]) == facts
    assert [r.response_format for r in srv.requests] == ["json_object", "json_object", "text", None]


def test_images_are_read_and_bad_requests_are_400(srv):
    images = [data_url("JPEG", (64, 48)), data_url("PNG", (32, 20))]
    with client_for(srv) as client:
        resp = client.chat.completions.create(model=MODEL_ID, messages=messages({}, images=images))
        assert resp.usage.prompt_tokens == sum(len(m["content"]) if isinstance(m["content"], str) else
                                               len(m["content"][0]["text"]) for m in messages({})) // 4 + 170
        bad = [("data:image/jpeg;base64,not*base64!", "base64"),
               ("data:image/png;base64," + base64.b64encode(b"GIF89a" + bytes(40)).decode(), "neither"),
               ("data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff" + bytes(10)).decode(), "read"),
               ("https://example.org/fundus.jpg", "data:")]
        for url, words in bad:
            with pytest.raises(openai.BadRequestError, match=words) as err:
                ask(client, images=[url])
            assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == "messages"
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model=MODEL_ID, messages=[])
        with pytest.raises(openai.BadRequestError, match="stream"):
            client.chat.completions.create(model=MODEL_ID, messages=messages(), stream=True)
    assert srv.requests[0].image_sizes == [(64, 48), (32, 20)]
    assert srv.count("bad_request") == 6 and srv.count() == 7  # 400s are not retried


def test_json_schema_unsupported_is_a_bad_request():
    with FakeOpenAIServer(supports_json_schema=False) as srv, client_for(srv) as client:
        with pytest.raises(openai.BadRequestError, match="'json_schema' is not supported") as err:
            ask(client)
        assert err.value.body["param"] == "response_format"
        assert json.loads(ask(client, {"type": "json_object"}, facts={"a": 1})) == {"a": 1}


def test_rate_limit_is_retried_after_retry_after(srv):
    srv.inject("rate_limit", retry_after=1)
    with client_for(srv) as client:
        t0 = time.monotonic()
        Finding.model_validate_json(ask(client))
        elapsed = time.monotonic() - t0
    assert elapsed >= 0.95
    assert [(r.outcome, r.status) for r in srv.requests] == [("rate_limit", 429), ("ok", 200)]


@pytest.mark.parametrize("kind,status", [("server_error", 500), ("unavailable", 503), ("drop", None)])
def test_transient_faults_are_retried(srv, kind, status):
    srv.inject(kind)
    with client_for(srv) as client:
        Finding.model_validate_json(ask(client))
    assert [(r.outcome, r.status) for r in srv.requests] == [(kind, status), ("ok", 200)]


def test_timeout_is_retried(srv):
    srv.inject("timeout", seconds=3)
    with client_for(srv, timeout=0.5) as client:
        t0 = time.monotonic()
        Finding.model_validate_json(ask(client))
        elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 2.5
    assert [r.outcome for r in srv.requests] == ["timeout", "ok"]


def test_malformed_json_and_schema_violation_are_200s(srv):
    srv.inject("malformed_json")
    srv.inject("schema_violation")
    with client_for(srv, max_retries=0) as client:
        with pytest.raises(json.JSONDecodeError):
            json.loads(ask(client))
        violating = ask(client)
        assert json.loads(violating) == {"unexpected": True}
        with pytest.raises(ValidationError):
            Finding.model_validate_json(violating)
        Finding.model_validate_json(ask(client))  # both faults used up
    assert [(r.outcome, r.status) for r in srv.requests] == \
        [("malformed_json", 200), ("schema_violation", 200), ("ok", 200)]


def test_contradiction_adds_the_claim_and_flips_laterality(srv):
    facts = {"laterality": "OD", "findings": ["drusen"]}
    srv.inject("contradiction")
    srv.inject("contradiction", claim="macular hole")
    with client_for(srv) as client:
        first = Finding.model_validate_json(ask(client, facts=facts))
        second = Finding.model_validate_json(ask(client, facts=facts))
    assert (first.laterality, first.findings) == ("OS", ["drusen", CLAIM])
    assert (second.laterality, second.findings) == ("OS", ["drusen", "macular hole"])


def test_faults_that_echo_the_api_key_as_some_servers_do(srv):
    """What a client must redact: the key it sent, repeated in a 401's JSON body, in any error body
    (JSON or plain text, 429/5xx after retries too) and in a model's answer."""
    key = "sk-test-echoed-0123456789"
    srv.inject("unauthorized")
    srv.inject("rate_limit", times=2, echo_key=True, retry_after=0)
    srv.inject("server_error", echo_key=True, text_body=True)
    srv.inject("schema_violation", echo_key=True)
    srv.inject("echo_key")
    with openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=1, timeout=10) as client:
        with pytest.raises(openai.AuthenticationError, match=f"Incorrect API key provided: {key}") as refused:
            ask(client)  # a 401 is not retried
        assert refused.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.RateLimitError, match=f"Authorization: Bearer {key}"):
            ask(client)  # both tries refused
        with pytest.raises(openai.InternalServerError) as text_body:
            client.with_options(max_retries=0).chat.completions.create(model=MODEL_ID, messages=messages())
        assert text_body.value.response.headers["content-type"].startswith("text/plain")
        assert text_body.value.body == f"injected fault: server_error (request headers: Authorization: Bearer {key})"
        assert json.loads(ask(client)) == {"unexpected": True, "note": f"api key {key}"}
        echoed = Finding.model_validate_json(ask(client, facts={"laterality": "OS", "findings": ["drusen seen"]}))
    assert echoed.laterality == "OS" and echoed.findings == [f"drusen seen (api key {key})"]  # enums stay valid
    assert [r.outcome for r in srv.requests] == ["unauthorized", "rate_limit", "rate_limit", "server_error",
                                                 "schema_violation", "echo_key"]
    assert [r.status for r in srv.requests][:4] == [401, 429, 429, 500]


def test_times_none_fails_every_request_until_cleared(srv):
    srv.inject("server_error", times=None)
    with client_for(srv, max_retries=1) as client:
        with pytest.raises(openai.InternalServerError):
            ask(client)
        assert srv.count("server_error") == 2
        srv.clear_faults()
        Finding.model_validate_json(ask(client))
    assert srv.count() == 3


def test_match_targets_only_matching_requests(srv):
    srv.inject("server_error", match="patient-B")
    with client_for(srv, max_retries=0) as client:
        ask(client, text="patient-A left eye")
        with pytest.raises(openai.InternalServerError):
            ask(client, text="patient-B right eye")
        ask(client, text="patient-B right eye")
    assert [r.outcome for r in srv.requests] == ["ok", "server_error", "ok"]
    srv.reset()
    assert srv.requests == [] and srv.count() == 0
    with pytest.raises(ValueError):
        srv.inject("meteor_strike")


def test_latency_overlaps_across_concurrent_requests():
    async def run(url: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0, timeout=5) as client:
            calls = [client.chat.completions.create(model=MODEL_ID, messages=messages({"n": i}),
                                                    response_format={"type": "json_object"}) for i in range(8)]
            return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    with FakeOpenAIServer(latency=0.3) as srv:
        t0 = time.monotonic()
        answers = asyncio.run(run(srv.base_url))
        elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 1.2
    assert sorted(json.loads(a)["n"] for a in answers) == list(range(8)) and srv.count("ok") == 8


def test_stop_is_quick_while_a_handler_sleeps():
    srv = FakeOpenAIServer().start()
    srv.inject("timeout", seconds=30)
    with client_for(srv, max_retries=0, timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            ask(client)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 1.0


def control(base_url: str, path: str, payload: dict | None = None):
    root = base_url.removesuffix("/v1")
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(root + path, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def test_subprocess_mode_and_control_endpoints():
    with serve_in_subprocess(latency=0.0) as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0, timeout=5) as client:
            assert Finding.model_validate_json(ask(client, facts={"laterality": "OS"})).laterality == "OS"
            control(url, "/_control/inject", {"kind": "unavailable", "times": 1, "match": "eye-7", "params": {}})
            with pytest.raises(openai.InternalServerError):
                ask(client, text="eye-7")
            seen = control(url, "/_control/requests")
            assert [(r["outcome"], r["status"], r["authorized"]) for r in seen] == \
                [("ok", 200, True), ("unavailable", 503, True)]
            assert "authorization" not in seen[0] and seen[0]["model"] == MODEL_ID
            assert control(url, "/_control/reset", {}) == {"ok": True}
            assert control(url, "/_control/requests") == []

"""The `openai` expand backend: a multimodal model behind any OpenAI-compatible server
describes each image and each region, in validated structured output.

This is where users spend money and time, so every request is content-addressed in a
response cache (a re-run pays only for what changed), bounded in concurrency, retried by the
openai client itself (429 with Retry-After, 5xx, dropped connections and timeouts, with
exponential backoff and jitter), priced against the run's budget before it is sent, and
watched by a circuit breaker. The API key is read from the environment when the client is
made and is never stored anywhere else; whatever comes back from the server (error bodies,
answers) passes through `redact_secrets` before it is kept, cached, logged or rejected, since
some servers echo the key they were sent.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import cv2
import openai
from pydantic import BaseModel, ValidationError

from fundus_engine import __version__
from fundus_engine.config import OpenAIConfig
from fundus_engine.evidence import DetectorEvidence, assessed_lesions, counted_lesions
from fundus_engine.ingest import cached_sha256, file_version
from fundus_engine.models import (Anatomy, Expansion, ImageDescription, ImageFindings, ImageRecord, Provenance,
                                  Region, RegionDescription, RegionFindings, Reject)
from fundus_engine.prompts import Prompt, load
from fundus_engine.vocabulary import BY_NAME, LESIONS, NORMAL

STAGE = "expand"
OUTPUT_MODELS: dict[str, type[BaseModel]] = {"ImageFindings": ImageFindings, "RegionFindings": RegionFindings}
log = logging.getLogger(__name__)


class CircuitOpen(RuntimeError):
    """Too many consecutive failed requests: the server is down or misconfigured."""


class BudgetExhausted(Exception):
    """Sending this request could take the run past `max_cost`."""


class RequestFailed(Exception):
    def __init__(self, reason: str, raw_output: str | None = None):
        super().__init__(reason)
        self.raw_output = raw_output


# --- the run's ledger: budget, circuit breaker, usage ------------------------------------

USAGE_KEYS = ("requests", "cache_hits", "repairs", "failed", "invalid", "not_sent_budget", "usage_missing",
              "prompt_tokens", "completion_tokens")


@dataclass
class Ledger:
    """Shared by every expand shard of one flow run (shards take turns, see `shard_lock`)."""

    config: OpenAIConfig
    usage: Counter = field(default_factory=Counter)
    cost_usd: float = 0.0
    reserved_usd: float = 0.0
    consecutive_failures: int = 0
    last_error: str = ""
    response_format: str | None = None  # negotiated with the server on first use
    # Prompt tokens per image, the largest seen: servers bill an image from ~85 to ~25k tokens, so
    # under a budget the first answer calibrates reservations before others are sent.
    image_tokens: float = 800.0
    calibrated: bool = False
    http_status: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    shard_lock: threading.Lock = field(default_factory=threading.Lock)

    def price(self, prompt_tokens: float, completion_tokens: float) -> float:
        p = self.config.prices
        return (prompt_tokens * p.input_per_million + completion_tokens * p.output_per_million) / 1e6

    def reserve(self, text_tokens: int, images: int, completion_tokens: int) -> float:
        """Hold the most a request may cost (its text, its images at the largest per-image count
        seen so far, its completion at max_tokens) against max_cost; returns the amount held."""
        with self.lock:
            estimate_usd = self.price(text_tokens + images * self.image_tokens, completion_tokens)
            limit = self.config.max_cost
            if limit is not None and self.cost_usd + self.reserved_usd + estimate_usd > limit:
                self.usage["not_sent_budget"] += 1
                raise BudgetExhausted(f"not sent: it could take the run past max_cost ${limit:.4f} "
                                      f"(spent ${self.cost_usd:.4f})")
            self.reserved_usd += estimate_usd
            return estimate_usd

    def release(self, estimate_usd: float) -> None:
        with self.lock:
            self.reserved_usd -= estimate_usd

    def settle(self, estimate_usd: float, text_tokens: int, images: int, usage) -> None:
        """An answered request: its billed usage, or, from a server that reports none, the amount
        held (so the budget still binds)."""
        with self.lock:
            self.reserved_usd -= estimate_usd
            self.usage["requests"] += 1
            self.calibrated = True
            if usage is None:
                self.usage["usage_missing"] += 1
                self.cost_usd += estimate_usd
                return
            if images:
                self.image_tokens = max(self.image_tokens, (usage.prompt_tokens - text_tokens) / images)
            self.usage["prompt_tokens"] += usage.prompt_tokens
            self.usage["completion_tokens"] += usage.completion_tokens
            self.cost_usd += self.price(usage.prompt_tokens, usage.completion_tokens)

    def failure(self, reason: str) -> None:
        with self.lock:
            self.usage["failed"] += 1
            self.consecutive_failures += 1
            self.last_error = reason

    def success(self) -> None:
        with self.lock:
            self.consecutive_failures = 0

    @property
    def circuit_open(self) -> bool:
        return self.consecutive_failures >= self.config.circuit_breaker

    def snapshot(self) -> dict:
        with self.lock:
            return {**{k: self.usage[k] for k in USAGE_KEYS}, "cost_usd": self.cost_usd,
                    "http_status": dict(self.http_status)}


_LEDGERS: dict[str, Ledger] = {}
_LEDGERS_LOCK = threading.Lock()


def ledger_for(run_id: str | None, config: OpenAIConfig) -> Ledger:
    """One ledger per flow run, so budget and circuit breaker span all of the run's shards."""
    if run_id is None:
        return Ledger(config)
    with _LEDGERS_LOCK:
        return _LEDGERS.setdefault(run_id, Ledger(config))


def close_run(run_id: str | None) -> None:
    with _LEDGERS_LOCK:
        _LEDGERS.pop(str(run_id), None)


def usage_delta(after: dict, before: dict) -> dict:
    delta = {k: after[k] - before[k] for k in (*USAGE_KEYS, "cost_usd")}
    delta["http_status"] = dict(Counter(after["http_status"]) - Counter(before["http_status"]))
    return delta


# --- response cache ----------------------------------------------------------------------

class ResponseCache:
    """Validated responses on disk, one JSON file per request key; safe to share across runs."""

    def __init__(self, root: Path, read: bool = True):
        self.root, self.read = Path(root), read

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        if not self.read or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a torn or foreign file is a miss, not an error

    def put(self, key: str, value: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)


# --- requests ----------------------------------------------------------------------------

@functools.cache
def json_schema(output: type[BaseModel]) -> dict:
    return output.model_json_schema()


def image_data_url(path: str, max_side: int) -> str:
    """The image as a JPEG data URL, no larger than max_side; cached (per version of the file)
    because an image's full view goes out with every one of its region requests."""
    return _image_data_url(path, max_side, file_version(path))


@functools.lru_cache(maxsize=512)
def _image_data_url(path: str, max_side: int, version: tuple[int, int]) -> str:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise RequestFailed(f"{path}: image could not be read for sending")
    scale = max_side / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode()


@dataclass
class Request:
    """One chat completion: what is sent, what must come back, and the key it is cached under."""

    item: str  # image sha256 or region id, for rejects
    prompt: Prompt
    output: type[BaseModel]
    system: str
    text: str
    images: list[str]  # file paths, sent as data URLs
    sampling: dict
    key: str = ""

    def estimate_tokens(self) -> tuple[int, int, int]:
        """(text tokens, with a margin over the usual 4 characters a token; images; completion)."""
        return int((len(self.system) + len(self.text)) / 3), len(self.images), self.sampling["max_tokens"]


def facts_of(region: Region) -> dict:
    return {"label": region.label, "name": region.display, "box_0_999": region.box_999,
            "confidence": round(region.confidence, 2), "source": region.source, "size_dd": region.size_dd,
            "fovea_distance_dd": region.fovea_distance_dd, "clock_hour": region.clock_hour,
            "quadrant": region.quadrant, "colour": region.colour}


def image_facts(record: ImageRecord, anatomy: Anatomy, regions: list[Region]) -> dict:
    lesions = Counter(r.display for r in regions if r.label in LESIONS)
    return {"laterality": anatomy.laterality, "diagnosis": record.diagnosis, "grade": record.grade,
            "cup_to_disc": anatomy.cup_to_disc, "quality": record.quality.grade,
            "lesion_counts": dict(lesions), "regions": [facts_of(r) for r in regions]}


class OpenAIExpander:
    """Describes images and regions with a model behind an OpenAI-compatible API."""

    name = "openai"

    def __init__(self, config: OpenAIConfig, prompts_dir: str | None = None, cache_dir: Path | None = None,
                 run_id: str | None = None, evidence: DetectorEvidence = DetectorEvidence()):
        self.config = config
        self.evidence = evidence
        self.image_prompt = load("expand/openai_image", prompts_dir)
        self.region_prompt = load("expand/openai_region", prompts_dir)
        self.prompts = [self.image_prompt, self.region_prompt]
        self.cache = ResponseCache(Path(config.cache_dir or cache_dir or ".fundus-llm-cache"), read=config.cache)
        self.ledger = ledger_for(run_id, config)

    def provenance(self) -> Provenance:
        p, r = self.image_prompt, self.region_prompt
        return Provenance(backend=self.name, model=self.config.model, prompt_id=p.id, prompt_version=p.version,
                          prompt_sha256=p.sha256, engine_version=__version__, region_prompt_id=r.id,
                          region_prompt_version=r.version, region_prompt_sha256=r.sha256)

    # requests ---------------------------------------------------------------------------

    def _request(self, prompt: Prompt, item: str, images: list[str], image_hashes: list[str], **context) -> Request:
        macros = prompt.module(knowledge=BY_NAME)
        sampling = {"temperature": prompt.meta.get("sampling", {}).get("temperature", 0.2),
                    "max_tokens": prompt.meta.get("sampling", {}).get("max_tokens", 800)}
        if self.config.temperature is not None:
            sampling["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            sampling["max_tokens"] = self.config.max_tokens
        request = Request(item=item, prompt=prompt, output=OUTPUT_MODELS[prompt.meta["output_model"]],
                          system=str(macros.system()).strip(), text=str(macros.user(**context)).strip(),
                          images=images, sampling=sampling)
        request.key = hashlib.sha256(json.dumps(
            [self.config.base_url, self.config.model, request.system, request.text, image_hashes,
             self.config.image_max_side, sampling,
             json_schema(request.output)], sort_keys=True).encode()).hexdigest()
        return request

    def image_request(self, record: ImageRecord, anatomy: Anatomy, regions: list[Region]) -> Request:
        return self._request(self.image_prompt, record.sha256, [record.path], [record.sha256], record=record,
                             anatomy=anatomy, regions=[r for r in regions if r.label in LESIONS],
                             facts=image_facts(record, anatomy, regions))

    def region_request(self, record: ImageRecord, anatomy: Anatomy, region: Region) -> Request:
        wanted = self.region_prompt.meta.get("images", ["crop"])
        paths = [{"full": record.path, "crop": region.crop_path, "marked": region.marked_path}[w] for w in wanted]
        paths = [p for p in paths if p]
        return self._request(self.region_prompt, region.region_id, paths, [cached_sha256(p) for p in paths],
                             record=record, anatomy=anatomy, region=region, facts=facts_of(region),
                             with_marked=bool(region.marked_path and "marked" in wanted))

    # calling ----------------------------------------------------------------------------

    def _client(self) -> openai.AsyncOpenAI:
        api_key = os.environ.get(self.config.api_key_env)
        if not api_key:
            log.warning("%s is not set; sending requests without an API key", self.config.api_key_env)

        async def count_status(response):
            with self.ledger.lock:
                self.ledger.http_status[str(response.status_code)] += 1

        http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [count_status]})
        return openai.AsyncOpenAI(base_url=self.config.base_url, api_key=api_key or "not-needed",
                                  timeout=self.config.timeout, max_retries=self.config.max_retries, http_client=http)

    def _response_format(self, output: type[BaseModel], mode: str) -> dict | None:
        if mode == "json_schema":
            return {"type": "json_schema",
                    "json_schema": {"name": output.__name__, "schema": json_schema(output), "strict": False}}
        return {"type": "json_object"} if mode == "json_object" else None

    async def _complete(self, client: openai.AsyncOpenAI, request: Request, messages: list[dict]):
        """One chat completion, stepping down json_schema -> json_object -> text if the server
        refuses a response format (remembered for the rest of the run)."""
        modes = ["json_schema", "json_object", "text"]
        if self.ledger.response_format is None:
            self.ledger.response_format = "json_schema" if self.config.response_format == "auto" \
                else self.config.response_format
        while True:
            mode = self.ledger.response_format
            # Passed as extra_body: the same JSON on the wire, but the client does not walk the whole
            # schema through its type transforms on every request (measured: ~30% of client CPU).
            kwargs = {"extra_body": {"response_format": rf}} if (rf := self._response_format(request.output, mode)) else {}
            sent = messages if mode == "json_schema" else with_schema_instruction(messages, request.output)
            try:
                return await client.chat.completions.create(model=self.config.model, messages=sent,
                                                            **request.sampling, **kwargs)
            except openai.BadRequestError as exc:
                refused = "response_format" in str(exc) or "json_schema" in str(exc)
                if not (refused and self.config.response_format == "auto" and mode != "text"):
                    raise
                self.ledger.response_format = modes[modes.index(mode) + 1]
                log.warning("server refused response_format %s; using %s", mode, self.ledger.response_format)

    async def _send(self, client, request: Request, messages: list[dict]) -> tuple[str, str | None]:
        if self.config.max_cost is not None and not self.ledger.calibrated:
            async with self._calibrating:  # under a budget, one request first: it shows how the server bills
                if not self.ledger.calibrated:
                    return await self._send_now(client, request, messages)
        return await self._send_now(client, request, messages)

    async def _send_now(self, client, request: Request, messages: list[dict]) -> tuple[str, str | None]:
        text_tokens, images, completion_tokens = request.estimate_tokens()
        estimate = self.ledger.reserve(text_tokens, images, completion_tokens)
        try:
            response = await self._complete(client, request, messages)
        except openai.APIError as exc:
            self.ledger.release(estimate)
            reason = redact_secrets(f"request failed after {self.config.max_retries} retries: {api_error(exc)}",
                                    self.config.api_key_env)
            self.ledger.failure(reason)
            raise RequestFailed(reason) from None  # the original (unredacted) error goes no further
        self.ledger.settle(estimate, text_tokens, images, response.usage)
        self.ledger.success()
        # Redacted on receipt: the answer is parsed, cached, repaired and rejected from here on.
        return (redact_secrets(response.choices[0].message.content or "", self.config.api_key_env),
                response.choices[0].finish_reason)

    async def call(self, client, semaphore: asyncio.Semaphore, request: Request) -> BaseModel:
        """The validated answer to one request: from the cache, or from the server with at most
        one repair request; raises RequestFailed with the raw output when it stays invalid."""
        cached = self.cache.get(request.key)
        try:  # a cached answer that no longer fits the output model is a miss, not an error
            answer = request.output.model_validate(cached["parsed"]) if isinstance(cached, dict) else None
        except (KeyError, ValidationError):
            answer = None
        if answer is not None:
            with self.ledger.lock:
                self.ledger.usage["cache_hits"] += 1
            return answer
        urls = await asyncio.gather(*(asyncio.to_thread(image_data_url, p, self.config.image_max_side)
                                      for p in request.images))
        messages = [{"role": "system", "content": request.system},
                    {"role": "user", "content": [{"type": "text", "text": request.text},
                                                 *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]
        async with semaphore:
            if self.ledger.circuit_open:
                raise CircuitOpen(self._circuit_message())
            attempt = messages
            for repairs_left in (1, 0):
                raw, finish_reason = await self._send(client, request, attempt)
                try:
                    parsed = parse_output(raw, request.output)
                    break
                except ValueError as error:
                    cut_off = finish_reason == "length"  # a repair would be cut off the same way
                    with self.ledger.lock:
                        self.ledger.usage["invalid" if cut_off or not repairs_left else "repairs"] += 1
                    if cut_off:
                        raise RequestFailed(f"answer cut off at max_tokens={request.sampling['max_tokens']}; "
                                            "raise expand.openai.max_tokens", raw)
                    if not repairs_left:
                        raise RequestFailed(f"invalid {request.output.__name__} after one repair: {error}", raw)
                    attempt = messages + [{"role": "assistant", "content": raw},
                                          {"role": "user", "content": f"That answer is not valid: {error}. Reply again "
                                           "with only the JSON object, with every required field."}]
        await asyncio.to_thread(self.cache.put, request.key, {
            "model": self.config.model, "prompt_id": request.prompt.id, "prompt_version": request.prompt.version,
            "content": raw, "parsed": parsed.model_dump(mode="json")})
        return parsed

    def _circuit_message(self) -> str:
        """Raised, so logged and stored by Prefect: redacted like everything else from the server."""
        message = (f"circuit breaker open: {self.ledger.consecutive_failures} consecutive failed requests to "
                   f"{redact_url(self.config.base_url)} (model {self.config.model}); last error: "
                   f"{self.ledger.last_error}. Everything already answered is kept in the response cache; "
                   "re-run to continue.")
        return redact_secrets(message, self.config.api_key_env)

    # the shard ----------------------------------------------------------------------------

    def expand_shard(self, items: list[tuple[ImageRecord, Anatomy, list[Region]]]):
        from fundus_engine.expand import ExpandResult

        with self.ledger.shard_lock:  # shards take turns; `concurrency` bounds the whole run
            before = self.ledger.snapshot()
            if self.ledger.circuit_open:
                raise CircuitOpen(self._circuit_message())
            result = asyncio.run(self._expand_all(items))
            result.usage = usage_delta(self.ledger.snapshot(), before)
            return result

    async def _expand_all(self, items):
        from fundus_engine.expand import ExpandResult

        regions_wanted = (lambda r: True) if self.config.regions == "all" else (lambda r: r.label in LESIONS)
        jobs = []
        for record, anatomy, regions in items:
            jobs.append((record, anatomy, regions, self.image_request(record, anatomy, regions),
                         [(r, self.region_request(record, anatomy, r)) for r in regions if regions_wanted(r)]))
        semaphore = asyncio.Semaphore(self.config.concurrency)
        self._calibrating = asyncio.Lock()  # bound to this event loop
        async with self._client() as client:
            async def run(request):
                try:
                    return await self.call(client, semaphore, request)
                except (RequestFailed, BudgetExhausted) as exc:
                    return exc

            flat = [req for job in jobs for req in (job[3], *(r for _, r in job[4]))]
            try:
                async with asyncio.TaskGroup() as group:  # a tripped breaker cancels what is still queued
                    tasks = [group.create_task(run(r)) for r in flat]
            except* CircuitOpen as tripped:
                raise tripped.exceptions[0] from None
            answers = {id(r): t.result() for r, t in zip(flat, tasks)}

        result = ExpandResult()
        for record, anatomy, regions, image_req, region_reqs in jobs:
            failures = [(req, answers[id(req)]) for req in (image_req, *(r for _, r in region_reqs))
                        if isinstance(answers[id(req)], Exception)]
            for req, exc in failures:
                result.complete = False
                result.rejects.append(Reject(stage=STAGE, item=req.item,
                                             reason=redact_secrets(f"{req.prompt.id}: {exc}", self.config.api_key_env),
                                             raw_output=redact_secrets(getattr(exc, "raw_output", None),
                                                                       self.config.api_key_env)))
            findings = answers[id(image_req)]
            if isinstance(findings, Exception):
                continue
            described = [RegionDescription(region_id=r.region_id, label=r.label, description=answers[id(req)].description,
                                           significance=answers[id(req)].significance)
                         for r, req in region_reqs if not isinstance(answers[id(req)], Exception)]
            result.expansions.append(self.expansion(record, anatomy, regions, findings, described))
        return result

    def expansion(self, record: ImageRecord, anatomy: Anatomy, regions: list[Region], findings: ImageFindings,
                  described: list[RegionDescription]) -> Expansion:
        if record.diagnosis:  # a source label outranks the model; disagreement is flagged below
            diagnosis, grade, source = record.diagnosis, record.grade, "label"
        else:
            diagnosis, grade, source = findings.diagnosis, findings.grade, "model"
        image = ImageDescription(overview=findings.overview, anatomy=findings.anatomy,
                                 positive_findings=findings.positive_findings,
                                 negative_findings=findings.negative_findings, diagnosis=diagnosis, grade=grade,
                                 diagnosis_source=source, evidence=findings.evidence or [findings.diagnosis])
        return Expansion(sha256=record.sha256, image=image, regions=described, provenance=self.provenance(),
                         flags=consistency_flags(findings, record, anatomy, regions),
                         assessed_lesions=assessed_lesions(record, self.evidence),
                         counted_lesions=counted_lesions(record, self.evidence))


def with_schema_instruction(messages: list[dict], output: type[BaseModel]) -> list[dict]:
    """Without server-side JSON schema support the schema travels in the prompt."""
    schema = json.dumps(json_schema(output), separators=(",", ":"))
    note = {"type": "text", "text": f"Reply with one JSON object that follows this JSON Schema:\n<schema>{schema}</schema>"}
    user = messages[1]
    return [messages[0], {**user, "content": [*user["content"], note]}, *messages[2:]]


def redact_url(url: str) -> str:
    """A server URL fit for logs and outputs: credentials some users put in the userinfo or the
    query string (`https://user:key@host/v1`, `?api-key=...`) are dropped."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


REDACTED = "[REDACTED]"
_TOKEN = r"[A-Za-z0-9._~+/\-]*[A-Za-z0-9_~+/\-]=*"  # bearer tokens, API keys, hex, base64 (not a final ".")
SECRET_SHAPES = re.compile(
    r"(?P<bearer>\bBearer\s+)" + _TOKEN                          # an Authorization header's value
    + r"|(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-*]{6,}"                  # OpenAI-style keys, masked ones too
    # a long token with a digit in it after a key/token word: "API key provided: ...", "token=..."
    + r"|(?P<word>\b(?:api[_ -]?key|key|token|secret|password|credential)s?\b[^A-Za-z0-9\n]{0,4}"
      r"(?:[A-Za-z]{1,12}[^A-Za-z0-9\n]{1,4})?)(?=[A-Za-z0-9._~+/\-]{20})(?=[A-Za-z0-9._~+/\-]*\d)" + _TOKEN,
    re.I)
MIN_KEY_CHARS = 8  # shorter values ("EMPTY", "none") are local servers' placeholders, not secrets


def redact_secrets(text: str | None, api_key_env: str | None = None) -> str | None:
    """Text from a model server fit for rejects, logs, caches and results: the API key held in
    the environment variable `api_key_env`, wherever it appears, and anything shaped like a
    credential (`Bearer ...`, `sk-...`, a long token after a key/token word) become [REDACTED].
    Some servers echo the key they were sent in error bodies; a model may repeat it."""
    if not text:
        return text
    key = os.environ.get(api_key_env, "").strip() if api_key_env else ""
    if len(key) >= MIN_KEY_CHARS:
        text = text.replace(key, REDACTED)
    return SECRET_SHAPES.sub(lambda m: (m["bearer"] or m["word"] or "") + REDACTED, text)


def api_error(exc: openai.APIError) -> str:
    """An API error for a reject: the client's message, plus the start of a plain-text error body
    (the client leaves those out). Not yet redacted."""
    text = f"{type(exc).__name__}: {exc}"
    body = exc.body.strip() if isinstance(exc.body, str) else ""
    return f"{text} - {body[:300]}" if body and body not in text else text


def parse_output(raw: str, output: type[BaseModel]) -> BaseModel:
    """Validate a model's answer; also accepts JSON inside a ```json fence or surrounding prose."""
    text = raw.strip()
    fenced = re.search(r"```(?:json)?\s*(\{.*\})\s*```", text, re.S)
    if fenced:
        text = fenced.group(1)
    elif not text.startswith("{") and "{" in text:
        text = text[text.index("{"):text.rindex("}") + 1]
    try:
        return output.model_validate_json(text)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors()[:5])
        raise ValueError(errors) from None


def mentioned(text: str, label: str) -> bool:
    """Whether text claims the lesion present. Negations are read as the report scorer reads them
    ("no microaneurysms, haemorrhages or exudates", "haemorrhages are not seen" claim none)."""
    from fundus_engine.benchmark import statements

    return True in statements(text).get(BY_NAME[label].report_finding, set())


def consistency_flags(findings: ImageFindings, record: ImageRecord, anatomy: Anatomy, regions: list[Region]) -> list[str]:
    """Contradictions between what the model claims and what was detected or labelled."""
    found = {r.label for r in regions} | {b.label for b in record.label_boxes}
    claims = " . ".join([*findings.positive_findings, *findings.evidence])
    flags = [f"unsupported_lesion:{label}" for label in LESIONS if label not in found and mentioned(claims, label)]
    known = anatomy.laterality if anatomy.laterality != "unknown" else record.laterality
    if known != "unknown" and findings.laterality not in (known, "unknown"):
        flags.append(f"laterality:{findings.laterality}!={known}")
    if record.diagnosis and says_normal(findings.diagnosis) != (record.diagnosis == NORMAL or record.dr_grade == 0):
        flags.append("diagnosis_disagrees_with_label")
    return flags


def says_normal(diagnosis: str) -> bool:
    return bool(re.search(r"\bnormal\b|\bno (?:apparent |visible )?(?:abnormalit|diabetic retinopathy|retinopathy|disease)",
                          diagnosis, re.I))

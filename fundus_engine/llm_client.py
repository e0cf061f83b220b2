"""The transport to a model behind any OpenAI-compatible server, apart from the prompts that make
its requests (`fundus_engine.expand_openai`), as distilabel keeps the LLM apart from the Task.

This is where users spend money and time, so every request is answered from the response cache
when it can be, bounded in concurrency, retried by the openai client itself (429 with
Retry-After, 5xx, dropped connections and timeouts, with exponential backoff and jitter),
priced against the run's budget before it is sent, and watched by a circuit breaker. The API
key is read from the environment when the client is made and is never stored anywhere else;
whatever comes back from the server passes through `redact_secrets` on receipt.
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
from collections import Counter
from dataclasses import dataclass

import cv2
import openai
from pydantic import BaseModel, ValidationError

from fundus_engine.config import OpenAIConfig
from fundus_engine.photo_files import file_version
from fundus_engine.llm_cache import ResponseCache
from fundus_engine.llm_ledger import USAGE_KEYS, BudgetExhausted, CircuitOpen, Ledger
from fundus_engine.prompts import Prompt
from fundus_engine.redaction import redact_secrets, redact_url

log = logging.getLogger(__name__)


class RequestFailed(Exception):
    def __init__(self, reason: str, raw_output: str | None = None):
        super().__init__(reason)
        self.raw_output = raw_output


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
    if not ok:  # never send an empty image: the model would describe nothing as if it were the photograph
        raise RequestFailed(f"{path}: image could not be encoded for sending")
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


class LLMClient:
    """Sends requests to the configured server and returns validated answers, against the run's
    ledger and the response cache; counts what it spent (`usage`) for the shard it serves."""

    def __init__(self, config: OpenAIConfig, ledger: Ledger, cache: ResponseCache):
        self.config, self.ledger, self.cache = config, ledger, cache
        self.reset_usage()

    def reset_usage(self) -> None:
        self.usage: Counter = Counter({k: 0 for k in USAGE_KEYS})
        self.http_status: Counter = Counter()
        self.cost_usd = 0.0

    def usage_report(self) -> dict:
        """What this client spent since `reset_usage`: the shard's usage in its completion record."""
        return {**{k: self.usage[k] for k in USAGE_KEYS}, "cost_usd": self.cost_usd,
                "http_status": dict(self.http_status)}

    def cache_key(self, request: Request, image_hashes: list[str]) -> str:
        """Everything that decides the answer: server, model, prompt text, images, sampling, schema."""
        return hashlib.sha256(json.dumps(
            [self.config.base_url, self.config.model, request.system, request.text, image_hashes,
             self.config.image_max_side, request.sampling,
             json_schema(request.output)], sort_keys=True).encode()).hexdigest()

    def connect(self) -> openai.AsyncOpenAI:
        """The openai client for one event loop (one shard); used as an async context manager."""
        self._format: str | None = None  # the response format, learnt from the run's ledger on first use
        api_key = os.environ.get(self.config.api_key_env)
        if not api_key:
            log.warning("%s is not set; sending requests without an API key", self.config.api_key_env)

        async def count_status(response):
            self.http_status[str(response.status_code)] += 1

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
        if self._format is None:  # what the run has learnt so far, else what the config asks for
            self._format = self.ledger.response_format or (
                "json_schema" if self.config.response_format == "auto" else self.config.response_format)
        while True:
            mode = self._format
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
                self._format = self.ledger.response_format = modes[modes.index(mode) + 1]
                log.warning("server refused response_format %s; using %s", mode, self._format)

    async def _send(self, client, request: Request, messages: list[dict]) -> tuple[str, str | None]:
        """Under a budget, the run's first request goes alone, in whichever process: its answer
        shows how the server bills an image before other reservations are made."""
        while self.config.max_cost is not None and not self.ledger.calibrated:
            if self.ledger.take_calibration(lease_seconds=self.config.timeout * (self.config.max_retries + 1) + 60):
                try:
                    return await self._send_now(client, request, messages)
                finally:
                    self.ledger.end_calibration()
            await asyncio.sleep(0.05)
        return await self._send_now(client, request, messages)

    async def _send_now(self, client, request: Request, messages: list[dict]) -> tuple[str, str | None]:
        text_tokens, images, completion_tokens = request.estimate_tokens()
        try:
            estimate = self.ledger.reserve(text_tokens, images, completion_tokens)
        except BudgetExhausted:
            self.usage["not_sent_budget"] += 1
            raise
        try:
            response = await self._complete(client, request, messages)
        except openai.APIError as exc:
            self.ledger.release(estimate)
            reason = redact_secrets(f"request failed after {self.config.max_retries} retries: {api_error(exc)}",
                                    self.config.api_key_env)
            self.usage["failed"] += 1
            self.ledger.failure(reason)
            raise RequestFailed(reason) from None  # the original (unredacted) error goes no further
        self.cost_usd += self.ledger.settle(estimate, text_tokens, images, response.usage)
        self.usage["requests"] += 1
        if response.usage is None:
            self.usage["usage_missing"] += 1
        else:
            self.usage["prompt_tokens"] += response.usage.prompt_tokens
            self.usage["completion_tokens"] += response.usage.completion_tokens
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
            self.usage["cache_hits"] += 1
            return answer
        urls = await asyncio.gather(*(asyncio.to_thread(image_data_url, p, self.config.image_max_side)
                                      for p in request.images))
        messages = [{"role": "system", "content": request.system},
                    {"role": "user", "content": [{"type": "text", "text": request.text},
                                                 *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]
        async with semaphore:
            if self.ledger.circuit_open:
                raise CircuitOpen(self.circuit_message())
            attempt = messages
            for repairs_left in (1, 0):
                raw, finish_reason = await self._send(client, request, attempt)
                try:
                    parsed = parse_output(raw, request.output)
                    break
                except ValueError as error:
                    cut_off = finish_reason == "length"  # a repair would be cut off the same way
                    self.usage["invalid" if cut_off or not repairs_left else "repairs"] += 1
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

    def circuit_message(self) -> str:
        """Raised, so logged and stored by Prefect: redacted like everything else from the server."""
        state = self.ledger.snapshot()
        message = (f"circuit breaker open: {state['consecutive_failures']} consecutive failed requests to "
                   f"{redact_url(self.config.base_url)} (model {self.config.model}); last error: "
                   f"{state['last_error']}. Everything already answered is kept in the response cache; "
                   "re-run to continue.")
        return redact_secrets(message, self.config.api_key_env)


def with_schema_instruction(messages: list[dict], output: type[BaseModel]) -> list[dict]:
    """Without server-side JSON schema support the schema travels in the prompt."""
    schema = json.dumps(json_schema(output), separators=(",", ":"))
    note = {"type": "text", "text": f"Reply with one JSON object that follows this JSON Schema:\n<schema>{schema}</schema>"}
    user = messages[1]
    return [messages[0], {**user, "content": [*user["content"], note]}, *messages[2:]]


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

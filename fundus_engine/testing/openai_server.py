"""A real loopback HTTP server speaking the OpenAI chat-completions API, for tests and benchmarks.

The official `openai` client runs over real HTTP (its retries, timeouts and pool included) while
answers stay deterministic (built from `<facts>{...}</facts>` in the user text, shaped by the
request's JSON schema) and faults can be injected. `python -m fundus_engine.testing.openai_server`
serves from its own process (no GIL shared with the client), controlled via `/_control/*`.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

MODEL_ID = "fake-fundus-vl"
# (status, error type) as OpenAI sends them; a 429 also carries code "rate_limit_exceeded", a 401
# code "invalid_api_key" and, as some servers and proxies do, the full key it was sent.
ERROR_FAULTS = {"rate_limit": (429, "requests"), "server_error": (500, "server_error"),
                "unavailable": (503, "server_error"), "unauthorized": (401, "invalid_request_error")}
# "echo_key": a valid answer whose free-text fields repeat the API key the request carried.
FAULT_KINDS = {*ERROR_FAULTS, "drop", "timeout", "malformed_json", "schema_violation", "contradiction", "truncated",
               "echo_key"}
ROLES = {"system", "developer", "user", "assistant", "tool"}
DATA_URL = re.compile(r"data:image/(?:jpeg|jpg|png);base64,(.*)", re.S)
FACTS = re.compile(r"<facts>(.*?)</facts>", re.S)
SCHEMA_IN_PROMPT = re.compile(r"<schema>(.*?)</schema>", re.S)
DEFAULT_CLAIM = "neovascularisation at the optic disc"


class BadRequest(Exception):
    """A request the real API would reject with 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class RequestRecord:
    """What the server saw of one chat request and how it answered (status None = dropped)."""
    model: str = ""
    text: str = ""
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    response_format: str | None = None
    authorization: str | None = None
    outcome: str = "ok"
    status: int | None = 200

    def public(self) -> dict:
        """JSON view for /_control/requests: never echo the key, only whether one was sent."""
        d = asdict(self)
        d["authorized"] = bool((d.pop("authorization") or "").startswith("Bearer "))
        return d


@dataclass
class Fault:
    kind: str
    times: int | None  # None = until clear_faults()
    match: str | None
    params: dict


# ---------------------------------------------------------------- request validation

@dataclass
class ChatRequest:
    body: dict
    text: str  # all text parts, joined by newlines
    user_text: str
    chars: int
    image_sizes: list[tuple[int, int]]
    response_format: dict | None


def image_size(url: Any) -> tuple[int, int]:
    """Reads only the header (cheap), but rejects what a real server could not decode."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest("only data: URLs (image/jpeg or image/png, base64) are supported", "messages")
    m = DATA_URL.fullmatch(url)
    if not m:
        raise BadRequest("image data URL must be data:image/jpeg or data:image/png with base64", "messages")
    try:
        raw = base64.b64decode(m.group(1), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image data URL is not valid base64", "messages") from None
    if not raw.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")):
        raise BadRequest("image is neither a JPEG nor a PNG", "messages")
    try:
        with Image.open(BytesIO(raw)) as im:
            return im.size
    except Exception as e:  # PIL raises many types for garbage headers
        raise BadRequest(f"could not read the image: {e}", "messages") from None


def parse_parts(content: Any) -> tuple[list[str], list[tuple[int, int]]]:
    """Message content -> (text parts, image sizes)."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of parts", "messages")
    texts, sizes = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            sizes.append(image_size(part["image_url"].get("url")))
        else:
            raise BadRequest(f"invalid content part: {str(part)[:80]}", "messages")
    return texts, sizes


def check_response_format(rf: Any, supports_json_schema: bool) -> None:
    if rf is None:
        return
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise BadRequest(f"invalid response_format: {rf!r}", "response_format")
    if kind == "json_schema":
        if not supports_json_schema:
            raise BadRequest("response_format type 'json_schema' is not supported by this server",
                             "response_format")
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str) or not isinstance(js.get("schema"), dict):
            raise BadRequest("response_format.json_schema needs a name and a schema object", "response_format")


def parse_chat_request(raw: bytes, supports_json_schema: bool) -> ChatRequest:
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise BadRequest("you must provide a model parameter", "model")
    if body.get("stream"):
        raise BadRequest("streaming is not supported by this server", "stream")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    texts, user_texts, sizes = [], [], []
    for msg in messages:
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or "content" not in msg:
            raise BadRequest("each message needs a valid role and content", "messages")
        t, s = parse_parts(msg["content"])
        texts += t
        sizes += s
        user_texts += t if msg["role"] == "user" else []
    check_response_format(body.get("response_format"), supports_json_schema)
    return ChatRequest(body, "\n".join(texts), "\n".join(user_texts), sum(map(len, texts)), sizes,
                       body.get("response_format"))


# ---------------------------------------------------------------- the deterministic "model"

def extract_facts(text: str) -> dict:
    m = FACTS.search(text)
    try:
        facts = json.loads(m.group(1)) if m else {}
    except ValueError:
        return {}
    return facts if isinstance(facts, dict) else {}


class SchemaWalker:
    """Builds a schema-conforming value, preferring facts[P] for a property P when it fits."""

    def __init__(self, root: dict, tag: str):
        self.root, self.tag = root, tag

    def resolve(self, s: dict) -> dict:
        while isinstance(s, dict) and "$ref" in s:
            node: Any = self.root
            for key in s["$ref"].lstrip("#/").split("/"):
                node = node[key]
            s = node
        return s if isinstance(s, dict) else {}

    def fits(self, v: Any, schema: dict) -> bool:
        s = self.resolve(schema)
        if "const" in s:
            return v == s["const"]
        if "enum" in s:
            return v in s["enum"]
        if branches := s.get("anyOf") or s.get("oneOf"):
            return any(self.fits(v, b) for b in branches)
        types = s.get("type") or ("object" if "properties" in s else None)
        types = [types] if isinstance(types, str) else types
        return not types or any(self._fits_type(v, t, s) for t in types)

    def _fits_type(self, v: Any, t: str, s: dict) -> bool:
        simple = {"null": v is None, "string": isinstance(v, str), "boolean": isinstance(v, bool),
                  "integer": isinstance(v, int) and not isinstance(v, bool),
                  "number": isinstance(v, (int, float)) and not isinstance(v, bool)}
        if t in simple:
            return simple[t]
        if t == "array":
            return (isinstance(v, list) and len(v) >= s.get("minItems", 0)
                    and all(self.fits(x, s.get("items", {})) for x in v))
        if t == "object" and isinstance(v, dict):
            props = s.get("properties", {})
            closed = s.get("additionalProperties", True) is False
            return (all(k in v for k in s.get("required", [])) and (not closed or set(v) <= set(props))
                    and all(self.fits(x, props[k]) for k, x in v.items() if k in props))
        return False

    def build(self, schema: dict, name: str, facts: dict, depth: int = 0) -> Any:
        s = self.resolve(schema)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return s["enum"][0]
        if branches := s.get("anyOf") or s.get("oneOf"):
            non_null = [b for b in branches if self.resolve(b).get("type") != "null"]
            return self.build((non_null or branches)[0], name, facts, depth + 1)
        t = s.get("type") or ("object" if "properties" in s else "string")
        t = next((x for x in t if x != "null"), "null") if isinstance(t, list) else t
        if t == "object":
            return self.build_object(s, facts, depth)
        if t == "array":  # depth guard: recursive schemas stop at minItems
            n = s.get("minItems", 0) if depth > 8 else max(1, s.get("minItems", 1))
            return [self.build(s.get("items", {}), name, facts, depth + 1) for _ in range(n)]
        return {"integer": 0, "number": 0.0, "boolean": False, "null": None}.get(t, f"{name} {self.tag}")

    def build_object(self, s: dict, facts: dict, depth: int) -> dict:
        """Nested objects read facts[P] when it is a dict, else keep reading the same (flat) facts."""
        out = {}
        for p, ps in s.get("properties", {}).items():
            if p in facts and self.fits(facts[p], ps):
                out[p] = facts[p]
            else:
                out[p] = self.build(ps, p, facts[p] if isinstance(facts.get(p), dict) else facts, depth + 1)
        return out


def deterministic_answer(req: ChatRequest) -> Any:
    facts = extract_facts(req.user_text)
    rf = req.response_format or {"type": "text"}
    if rf["type"] == "json_schema":
        schema, name = rf["json_schema"]["schema"], rf["json_schema"]["name"]
    elif (in_prompt := SCHEMA_IN_PROMPT.search(req.user_text)) is not None:
        schema = json.loads(in_prompt.group(1))  # a model following a schema given in the prompt
        name = schema.get("title", "answer")
    else:
        return facts or {"note": "no schema"}
    tag = hashlib.sha256(json.dumps(req.body["messages"], sort_keys=True).encode()).hexdigest()[:8]
    return SchemaWalker(schema, tag).build(schema, name, facts)


def contradict(answer: Any, claim: str) -> Any:
    """Plant a claim the image cannot support and flip laterality: what a verifier must catch."""
    def walk(node: Any, state: dict) -> None:
        if isinstance(node, dict):
            if node.get("laterality") in ("OD", "OS") and not state["flipped"]:
                node["laterality"], state["flipped"] = {"OD": "OS", "OS": "OD"}[node["laterality"]], True
            for v in node.values():
                if isinstance(v, list) and all(isinstance(x, str) for x in v) and not state["claimed"]:
                    v.append(claim)
                    state["claimed"] = True
                walk(v, state)
        elif isinstance(node, list):
            for v in node:
                walk(v, state)
    state = {"flipped": False, "claimed": False}
    walk(answer, state)
    if not state["claimed"] and isinstance(answer, dict):
        answer["claims"] = [claim]
    return answer


def sent_key(authorization: str | None) -> str:
    """The API key a request carried (its Authorization header without the scheme)."""
    return (authorization or "").removeprefix("Bearer ").strip()


def echo_key(answer: Any, key: str) -> Any:
    """A model that repeats its credentials: every free-text string (one with a space, so enum
    values such as "OD" stay valid) gets the key appended."""
    if isinstance(answer, dict):
        return {k: echo_key(v, key) for k, v in answer.items()}
    if isinstance(answer, list):
        return [echo_key(v, key) for v in answer]
    return f"{answer} (api key {key})" if isinstance(answer, str) and " " in answer else answer


def render_content(req: ChatRequest, fault: Fault | None, authorization: str | None = None) -> str:
    """The answer's text. `echo_key=True` in any content fault's params (and the `echo_key` kind)
    plants the request's API key in it."""
    answer = deterministic_answer(req)
    if fault and fault.kind == "schema_violation":
        answer = {"unexpected": True}
    if fault and fault.kind == "contradiction":
        answer = contradict(answer, fault.params.get("claim", DEFAULT_CLAIM))
    if fault and (fault.kind == "echo_key" or fault.params.get("echo_key")):
        key = sent_key(authorization)
        answer = echo_key(answer, key)
        if key not in json.dumps(answer) and isinstance(answer, dict):  # no free text to plant it in
            answer["note"] = f"api key {key}"
    text = json.dumps(answer)
    if fault and fault.kind in ("malformed_json", "truncated"):
        text = text[: len(text) // 2]
    if (req.response_format or {"type": "text"})["type"] == "text":
        return f"Here is the structured description.\n```json\n{text}\n```"
    return text


def completion(req: ChatRequest, content: str, tokens_per_image: int = 85, report_usage: bool = True,
               finish_reason: str = "stop") -> dict:
    """A chat.completion body. Servers bill images very differently (OpenAI's high detail about
    25k tokens for a 1024-px image, Qwen2.5-VL about 1.3k), hence `tokens_per_image`; some
    servers send no usage at all."""
    prompt = req.chars // 4 + tokens_per_image * len(req.image_sizes)
    done = len(content) // 4 + 1
    body = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": req.body["model"], "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": finish_reason}]}
    if report_usage:
        body["usage"] = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
    return body


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def fault_error(kind: str, params: dict, authorization: str | None) -> tuple[int, str, str]:
    """(status, content type, body) of an injected error fault. `unauthorized` always echoes the
    key it was sent; `echo_key=True` makes any error echo the Authorization header;
    `text_body=True` sends text/plain instead of OpenAI's JSON error object."""
    status, type_ = ERROR_FAULTS[kind]
    if kind == "unauthorized":
        message = (f"Incorrect API key provided: {sent_key(authorization)}. "
                   "You can find your API key at https://platform.openai.com/account/api-keys.")
    else:
        message = f"injected fault: {kind}"
    if params.get("echo_key"):
        message += f" (request headers: Authorization: {authorization})"
    if params.get("text_body"):
        return status, "text/plain; charset=utf-8", message
    code = {"rate_limit": "rate_limit_exceeded", "unauthorized": "invalid_api_key"}.get(kind)
    return status, "application/json", json.dumps(error_body(message, type_, code=code))


# ---------------------------------------------------------------- HTTP plumbing

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API: exercises the client's pool
    # Headers and body go out in separate writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms a response), which would swamp the latency being simulated.
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    def send_json(self, status: int, payload: Any, headers: dict | None = None) -> None:
        self.send_body(status, "application/json", json.dumps(payload), headers)

    def send_body(self, status: int, content_type: str, body: str, headers: dict | None = None) -> None:
        data = body.encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up first (e.g. it timed out): nothing to tell it
            self.close_connection = True

    def do_GET(self) -> None:
        fake: FakeOpenAIServer = self.server.fake  # type: ignore[attr-defined]
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "fundus-engine"}]})
        elif path == "/_control/requests":
            with fake._lock:
                self.send_json(200, [r.public() for r in fake.requests])
        else:
            self.send_json(404, error_body(f"unknown path {path}", "invalid_request_error"))

    def do_POST(self) -> None:
        fake: FakeOpenAIServer = self.server.fake  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path == "/v1/chat/completions":
                return self.chat(fake, raw)
            if path == "/_control/inject":
                c = json.loads(raw)
                fake.inject(c["kind"], c.get("times", 1), c.get("match"), **(c.get("params") or {}))
            elif path == "/_control/reset":
                fake.reset()
            else:
                return self.send_json(404, error_body(f"unknown path {path}", "invalid_request_error"))
            self.send_json(200, {"ok": True})
        except (ValueError, KeyError, TypeError) as e:
            self.send_json(400, error_body(f"bad control request: {e}", "invalid_request_error"))

    def chat(self, fake: FakeOpenAIServer, raw: bytes) -> None:
        rec = RequestRecord(authorization=self.headers.get("Authorization"))
        try:
            req = parse_chat_request(raw, fake.supports_json_schema)
        except BadRequest as e:
            rec.outcome, rec.status = "bad_request", 400
            fake._record(rec)
            fake._sleep(fake.latency)
            return self.send_json(400, error_body(str(e), "invalid_request_error", e.param))
        rec.model, rec.text, rec.image_sizes = req.body["model"], req.text, req.image_sizes
        rec.response_format = (req.response_format or {}).get("type")
        fault = fake._take_fault(req.text)
        kind = fault.kind if fault else "ok"
        rec.outcome = kind
        rec.status = ERROR_FAULTS[kind][0] if kind in ERROR_FAULTS else None if kind == "drop" else 200
        fake._record(rec)
        fake._sleep(fake.latency)
        if kind == "drop":
            self.close_connection = True  # closed by the server without a single response byte
        elif kind in ERROR_FAULTS:
            headers = {"Retry-After": str(fault.params.get("retry_after", 1))} if kind == "rate_limit" else None
            self.send_body(*fault_error(kind, fault.params, rec.authorization), headers)
        else:
            if kind == "timeout":
                fake._sleep(fault.params.get("seconds", 5))
            content = render_content(req, fault, rec.authorization)
            self.send_json(200, completion(req, content, fake.tokens_per_image, fake.report_usage,
                                           "length" if kind == "truncated" else "stop"))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], fake: FakeOpenAIServer):
        self.fake, self.open_sockets, self.sockets_lock = fake, set(), threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # disconnects are the client's business
            super().handle_error(request, client_address)

    def close_all(self) -> None:
        """Wake handler threads stuck on idle keep-alive reads so stop() leaves nothing open."""
        with self.sockets_lock:
            for s in list(self.open_sockets):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class FakeOpenAIServer:
    """`with FakeOpenAIServer(latency=0.0) as srv:` serves on srv.base_url until the block ends."""

    def __init__(self, latency: float = 0.0, supports_json_schema: bool = True, port: int = 0):
        self.latency, self.supports_json_schema, self.port = latency, supports_json_schema, port
        self.tokens_per_image, self.report_usage = 85, True  # billing knobs, set by tests
        self.requests: list[RequestRecord] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._stopping.clear()
        self._httpd = _HTTPServer(("127.0.0.1", self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-openai-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Quick even mid-request: sleeping handlers are woken, open connections shut."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.close_all()
        self._thread.join(5)
        self._httpd = self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def inject(self, kind: str, times: int | None = 1, match: str | None = None, **params: Any) -> None:
        """Queue a fault (FIFO) for the next `times` requests whose text contains `match`."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        with self._lock:
            self._faults.append(Fault(kind, times, match, params))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()
            self.tokens_per_image, self.report_usage = 85, True

    def count(self, outcome: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if outcome is None or r.outcome == outcome)

    def _take_fault(self, text: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.match is None or f.match in text:
                    if f.times is not None:
                        f.times -= 1
                        if f.times == 0:
                            self._faults.remove(f)
                    return f
        return None

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append(rec)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


# ---------------------------------------------------------------- subprocess mode

@contextmanager
def serve_in_subprocess(latency: float = 0.0, supports_json_schema: bool = True,
                        startup_timeout: float = 20.0) -> Iterator[str]:
    """Yield the base URL of a server in its own process (no GIL shared with the client)."""
    cmd = [sys.executable, "-m", "fundus_engine.testing.openai_server", "--latency", str(latency), "--port", "0"]
    cmd += [] if supports_json_schema else ["--no-json-schema"]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], startup_timeout)
        line = proc.stdout.readline().strip() if ready else ""
        if not line.startswith("listening "):
            raise RuntimeError(f"fake OpenAI server did not start (exit code {proc.poll()}): {line!r}")
        yield line.split(" ", 1)[1]
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--no-json-schema", action="store_true")
    args = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):  # explicit: SIGINT may be ignored in background jobs
        signal.signal(sig, lambda *_: sys.exit(0))
    srv = FakeOpenAIServer(args.latency, not args.no_json_schema, args.port).start()
    print(f"listening {srv.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()

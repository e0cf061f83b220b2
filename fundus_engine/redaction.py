"""Secrets kept out of what is stored: some servers echo the API key they were sent, and some
users put credentials in the server URL, so server text and URLs are redacted before they are
kept, cached, logged or rejected."""
from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """A server URL fit for logs and outputs: credentials some users put in the userinfo or the
    query string (`https://user:key@host/v1`, `?api-key=...`) are dropped."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# query parameter names that carry a credential: api-key, x-api-key, access_token, auth,
# password, sig (Azure SAS), code (Azure Functions), ...; a version or model name is no secret
_SECRET_PARAMETER = re.compile(r"key|token|auth|secret|passw|pwd|sig|credential|session|^code$", re.I)


def secret_query_parameters(url: str) -> list[str]:
    """Names of the URL's query parameters that look like they carry a credential."""
    from urllib.parse import parse_qsl

    return [name for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)
            if _SECRET_PARAMETER.search(name)]


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

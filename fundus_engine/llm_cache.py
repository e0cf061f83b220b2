"""The model server's response cache: every request is content-addressed, so a re-run pays only
for the requests whose content changed."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path


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

"""The user's cache folder, for work that depends on file contents alone and is shared by every
build and training on the machine: detector exports, boxes made from masks."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(what: str) -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fundus-engine" / what

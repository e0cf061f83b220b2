"""Content-stable shards: which images form each unit of work, kept from build to build.

Slicing the sorted path list would move every later image when one photograph sorting early is
added, re-keying (and recomputing) every later shard. Instead the assignment of image hashes to
shard numbers is kept in `OUT/stages/shards.json` and only appended to: new photographs fill the
last shard and then new ones, a removed photograph shrinks only its own shard.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fundus_engine.photo_files import SourceFile


def assign_shards(sources: list[SourceFile], previous: dict[str, int], shard_size: int
                  ) -> dict[int, list[SourceFile]]:
    """Shard number -> its images (by path), keeping every image hash where `previous` put it."""
    shards: dict[int, list[SourceFile]] = {}
    new = []
    for source in sorted(sources, key=lambda s: s.relpath):
        if source.sha256 in previous:
            shards.setdefault(previous[source.sha256], []).append(source)
        else:
            new.append(source)
    last = max([*previous.values(), -1])
    if new and last >= 0 and len(shards.get(last, [])) < shard_size:  # the open shard takes new images first
        room = shard_size - len(shards.get(last, []))
        shards.setdefault(last, []).extend(new[:room])
        new = new[room:]
    for start in range(0, len(new), shard_size):
        last += 1
        shards[last] = new[start:start + shard_size]
    return {n: sorted(members, key=lambda s: s.relpath) for n, members in sorted(shards.items())}


def load_assignment(out: Path, shard_size: int) -> dict[str, int]:
    """The previous build's image hash -> shard number; empty when there was none, or it used
    another shard size (then everything is sharded afresh)."""
    path = Path(out) / "stages" / "shards.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("shards", {}) if data.get("shard_size") == shard_size else {}


def save_assignment(out: Path, shard_size: int, shards: dict[int, list[SourceFile]]) -> None:
    path = Path(out) / "stages" / "shards.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"shard_size": shard_size,
                               "shards": {s.sha256: n for n, members in shards.items() for s in members}}))
    os.replace(tmp, path)

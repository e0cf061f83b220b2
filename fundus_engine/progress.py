"""How far a build is: shards done per stage, images per second, time left, rejects so far.

The flow reports each finished shard-stage here; the state is kept in `OUT/logs/progress.json`
(rewritten atomically) so that any viewer, the CLI's live display or a user's `watch cat`, can
follow a build without talking to Prefect.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class StageProgress:
    total: int  # shards
    done: int = 0
    cached: int = 0
    images: int = 0  # images in the shards done
    rejects: int = 0
    seconds: float = 0.0  # since the build started, when the last shard finished

    def rate(self) -> float | None:
        """Images per second over the shards computed so far (cached ones cost nothing)."""
        return self.images / self.seconds if self.seconds > 0 and self.images else None

    def eta(self, images_left: int) -> float | None:
        rate = self.rate()
        return images_left / rate if rate else None


@dataclass
class BuildProgress:
    path: Path
    stages: dict[str, StageProgress]
    shard_images: dict[int, int]  # shard -> images in it
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, out: Path, stages: tuple[str, ...], shard_images: dict[int, int]) -> "BuildProgress":
        progress = cls(Path(out) / "logs" / "progress.json",
                       {stage: StageProgress(total=len(shard_images)) for stage in stages}, dict(shard_images))
        progress.save()
        return progress

    def finished(self, stage: str, shard: int, rejects: int, cached: bool) -> str:
        """Record one finished shard-stage; returns the stage's progress line."""
        s = self.stages[stage]
        s.done += 1
        s.cached += cached
        s.rejects += rejects
        if not cached:
            s.images += self.shard_images.get(shard, 0)
            s.seconds = time.monotonic() - self.started
        self.save()
        return self.line(stage)

    def line(self, stage: str) -> str:
        s = self.stages[stage]
        left = sum(self.shard_images.values()) * (s.total - s.done) // max(1, s.total)
        rate, eta = s.rate(), s.eta(left)
        return (f"{stage}: {s.done}/{s.total} shards ({s.cached} cached), "
                f"{f'{rate:.1f} images/s' if rate else '- images/s'}, "
                f"ETA {f'{eta:.0f} s' if eta is not None and s.done < s.total else '-'}, {s.rejects} rejects")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"stages": {k: asdict(v) for k, v in self.stages.items()},
                                   "images": sum(self.shard_images.values())}))
        os.replace(tmp, self.path)


def read_progress(out: Path) -> dict | None:
    """The progress file of a running (or the last) build, or None."""
    try:
        return json.loads((Path(out) / "logs" / "progress.json").read_text())
    except (OSError, ValueError):
        return None

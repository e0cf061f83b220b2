"""Decoded photographs handed from one stage of a shard to the next in the same process, so that a
photograph is decoded once per shard-stage chain where it can be: ingest keeps what it decoded at
full scale (and a DICOM photograph's pixels), detect takes them or decodes, and keeps them for crop,
which takes them or decodes.

Only where every stage of a shard runs in one process (the thread runner, `for_runner`); Dask and
Ray workers may run a shard's next stage elsewhere, where kept pixels would only hold memory. A
photograph not handed over is decoded by the same function (`decoding.decode_bgr`) that decoded the
one kept: the handoff changes how often a photograph is decoded, never its pixels.

Bounded in bytes. Full, it keeps no more: stages take photographs in the order they were kept, so
the oldest are needed soonest. `clear` (at the end of a build) drops what a failed stage left.
"""
from __future__ import annotations

import threading

import numpy as np

from fundus_engine.config import RunnerConfig

# About 21 decoded 16-megapixel photographs, or a whole shard of 64 at 4 megapixels.
MAX_BYTES = 1 << 30


class PixelHandoff:
    """Kept pixels belong to the handoff until taken, then to the taker: neither keeper nor taker
    changes an array while the other may hold it."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self._held: dict[tuple[str, str], np.ndarray] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def keep(self, path: str, sha256: str, bgr: np.ndarray) -> bool:
        """Hold the photograph's pixels for the next stage; False when there is no room."""
        key = (str(path), sha256)
        with self._lock:
            if key in self._held or self._bytes + bgr.nbytes > self.max_bytes:
                return False
            self._held[key] = bgr
            self._bytes += bgr.nbytes
            return True

    def take(self, path: str, sha256: str) -> np.ndarray | None:
        """The pixels kept for this photograph (no longer held here), or None: decode it."""
        with self._lock:
            bgr = self._held.pop((str(path), sha256), None)
            if bgr is not None:
                self._bytes -= bgr.nbytes
            return bgr

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._bytes = 0


PIXELS = PixelHandoff()  # the process's: the threads of a build share it


def for_runner(runner: RunnerConfig) -> PixelHandoff | None:
    """The process's handoff where a shard's stages all run in it, else None (decode in each)."""
    return PIXELS if runner.kind == "thread" else None

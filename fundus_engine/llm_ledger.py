"""The run's ledger for a model server: budget, circuit breaker and the negotiated response format,
shared by every expand shard of one run in every worker process (a sqlite file in the output
folder), so `max_cost` and `circuit_breaker` bind the run rather than a shard or a process.

What one shard spent (requests, tokens, cost) is counted by its client (`llm_client.LLMClient`)
and travels in the shard's completion record; the ledger holds only what the run shares.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from fundus_engine.config import OpenAIConfig

USAGE_KEYS = ("requests", "cache_hits", "repairs", "failed", "invalid", "not_sent_budget", "usage_missing",
              "prompt_tokens", "completion_tokens")

# Prompt tokens per image before any answer calibrates it: servers bill an image from ~85 to ~25k
# tokens, so under a budget the first answer of the run calibrates reservations before others go.
FIRST_IMAGE_TOKENS = 800.0

_SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    cost_usd REAL NOT NULL DEFAULT 0,
    reserved_usd REAL NOT NULL DEFAULT 0,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    response_format TEXT,
    image_tokens REAL NOT NULL DEFAULT %r,
    calibrated INTEGER NOT NULL DEFAULT 0,
    calibrating_until REAL NOT NULL DEFAULT 0)""" % FIRST_IMAGE_TOKENS


class CircuitOpen(RuntimeError):
    """Too many consecutive failed requests: the server is down or misconfigured."""


class BudgetExhausted(Exception):
    """Sending this request could take the run past `max_cost`."""


class Ledger:
    """One run's shared state. With a `path`, every process that opens the same file and run id
    shares it (sqlite's file locks make each update atomic); without, it lives in this process."""

    def __init__(self, config: OpenAIConfig, path: Path | None = None, run_id: str | None = None):
        self.config, self.run_id = config, run_id or "local"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Rollback journal, not WAL: WAL needs shared memory, which storage seen by several machines
        # does not give. No fsync: the ledger matters only while its run is alive.
        self._db = sqlite3.connect(str(path) if path else ":memory:", timeout=120, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA synchronous=OFF")
        self._lock = threading.Lock()  # one connection, used from the event loop and worker threads
        with self._write():
            self._db.execute(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO runs (run_id) VALUES (?)", (self.run_id,))
        self._calibrated = False  # once true, it stays true: no need to ask the file again

    def _write(self):
        return _Transaction(self)

    def _row(self, *columns: str) -> tuple:
        with self._lock:
            return self._db.execute(f"SELECT {', '.join(columns)} FROM runs WHERE run_id = ?",
                                    (self.run_id,)).fetchone()

    def price(self, prompt_tokens: float, completion_tokens: float) -> float:
        p = self.config.prices
        return (prompt_tokens * p.input_per_million + completion_tokens * p.output_per_million) / 1e6

    # the budget -------------------------------------------------------------------------------

    def reserve(self, text_tokens: int, images: int, completion_tokens: int) -> float:
        """Hold the most a request may cost (its text, its images at the largest per-image count
        seen so far in the run, its completion at max_tokens) against max_cost; returns the amount
        held (without a max_cost, the estimate, held nowhere)."""
        limit = self.config.max_cost
        if limit is None:
            return self.price(text_tokens + images * self._row("image_tokens")[0], completion_tokens)
        with self._write() as db:
            cost, reserved, image_tokens = db.execute(
                "SELECT cost_usd, reserved_usd, image_tokens FROM runs WHERE run_id = ?", (self.run_id,)).fetchone()
            estimate_usd = self.price(text_tokens + images * image_tokens, completion_tokens)
            if cost + reserved + estimate_usd > limit:
                raise BudgetExhausted(f"not sent: it could take the run past max_cost ${limit:.4f} "
                                      f"(spent ${cost:.4f})")
            db.execute("UPDATE runs SET reserved_usd = reserved_usd + ? WHERE run_id = ?", (estimate_usd, self.run_id))
        return estimate_usd

    @property
    def _held(self) -> bool:
        return self.config.max_cost is not None

    def release(self, estimate_usd: float) -> None:
        if self._held:
            with self._write() as db:
                db.execute("UPDATE runs SET reserved_usd = reserved_usd - ? WHERE run_id = ?",
                           (estimate_usd, self.run_id))

    def settle(self, estimate_usd: float, text_tokens: int, images: int, usage) -> float:
        """An answered request: charges its billed usage, or, from a server that reports none, the
        amount held (so the budget still binds); learns the per-image token count. Returns the charge."""
        charged = estimate_usd if usage is None else self.price(usage.prompt_tokens, usage.completion_tokens)
        per_image = (usage.prompt_tokens - text_tokens) / images if usage is not None and images else 0.0
        with self._write() as db:
            db.execute("UPDATE runs SET reserved_usd = reserved_usd - ?, cost_usd = cost_usd + ?, calibrated = 1, "
                       "image_tokens = MAX(image_tokens, ?), consecutive_failures = 0 WHERE run_id = ?",
                       (estimate_usd if self._held else 0.0, charged, per_image, self.run_id))
        self._calibrated = True
        return charged

    @property
    def calibrated(self) -> bool:
        if not self._calibrated:
            self._calibrated = bool(self._row("calibrated")[0])
        return self._calibrated

    def take_calibration(self, lease_seconds: float) -> bool:
        """Under a budget the run's first request goes alone; True when this caller may send it.
        The lease expires, so a worker that dies while holding it stops no one."""
        now = time.time()
        with self._write() as db:
            taken = db.execute("UPDATE runs SET calibrating_until = ? WHERE run_id = ? AND calibrated = 0 "
                               "AND calibrating_until < ?", (now + lease_seconds, self.run_id, now)).rowcount
        return bool(taken)

    def end_calibration(self) -> None:
        with self._write() as db:
            db.execute("UPDATE runs SET calibrating_until = 0 WHERE run_id = ?", (self.run_id,))

    # the circuit breaker ------------------------------------------------------------------------

    def failure(self, reason: str) -> None:
        with self._write() as db:
            db.execute("UPDATE runs SET consecutive_failures = consecutive_failures + 1, last_error = ? "
                       "WHERE run_id = ?", (reason, self.run_id))

    @property
    def consecutive_failures(self) -> int:
        return self._row("consecutive_failures")[0]

    @property
    def last_error(self) -> str:
        return self._row("last_error")[0]

    @property
    def circuit_open(self) -> bool:
        return self.consecutive_failures >= self.config.circuit_breaker

    # the response format the server accepts ---------------------------------------------------

    @property
    def response_format(self) -> str | None:
        return self._row("response_format")[0]

    @response_format.setter
    def response_format(self, mode: str) -> None:
        with self._write() as db:
            db.execute("UPDATE runs SET response_format = ? WHERE run_id = ?", (mode, self.run_id))

    def snapshot(self) -> dict:
        cost, failures, error = self._row("cost_usd", "consecutive_failures", "last_error")
        return {"cost_usd": cost, "consecutive_failures": failures, "last_error": error}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the connection's thread lock: the read and the update of a
    reservation happen with no other process in between."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def __enter__(self) -> sqlite3.Connection:
        self.ledger._lock.acquire()
        try:
            self.ledger._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.ledger._lock.release()
            raise
        return self.ledger._db

    def __exit__(self, kind, error, trace) -> None:
        try:
            self.ledger._db.execute("ROLLBACK" if kind else "COMMIT")
        finally:
            self.ledger._lock.release()


def ledger_path(out: Path) -> Path:
    """Where a build's ledger lives: beside its response cache, on storage every worker sees."""
    return Path(out) / ".cache" / "llm-ledger.sqlite"

"""The run's ledger for a model server: budget, circuit breaker and usage, shared by every expand
shard of one flow run, so `max_cost` and `circuit_breaker` bind the run rather than each shard."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from fundus_engine.config import OpenAIConfig

USAGE_KEYS = ("requests", "cache_hits", "repairs", "failed", "invalid", "not_sent_budget", "usage_missing",
              "prompt_tokens", "completion_tokens")


class CircuitOpen(RuntimeError):
    """Too many consecutive failed requests: the server is down or misconfigured."""


class BudgetExhausted(Exception):
    """Sending this request could take the run past `max_cost`."""


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

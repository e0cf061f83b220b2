"""The run's model ledger across worker processes: two real processes expand halves of one shard
against the loopback OpenAI server, sharing one ledger file, as two Dask or Ray workers of a
run do. Budget and circuit breaker must bind their sum, not each process."""
from __future__ import annotations

import multiprocessing
import threading

import pytest

from fundus_engine.config import OpenAIConfig, Prices
from fundus_engine.llm_ledger import BudgetExhausted, Ledger
from fundus_engine.testing.openai_server import FakeOpenAIServer
from fundus_engine.testing.shards import prepared_shard

HEAVY = Prices(input_per_million=0.15, output_per_million=0.6)


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """Eight synthetic images through ingest, detect and crop, in two halves of four."""
    records, anatomies, regions = prepared_shard(tmp_path_factory.mktemp("ledger-in"),
                                                 tmp_path_factory.mktemp("ledger-out"), 8, seed=91, size=320)
    halves = []
    for part in (records[:4], records[4:]):
        keys = {r.sha256 for r in part}
        halves.append((part, [a for a in anatomies if a.sha256 in keys], [g for g in regions if g.sha256 in keys]))
    return halves


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def _expand_in_process(config: dict, ledger_path: str, run_id: str, cache_dir: str, shard, start, results) -> None:
    """One worker process: its own expander, the run's ledger file."""
    from pathlib import Path

    from fundus_engine.expand import expand
    from fundus_engine.expand_openai import OpenAIExpander

    expander = OpenAIExpander(OpenAIConfig(**config), cache_dir=Path(cache_dir), run_id=run_id,
                              ledger_path=Path(ledger_path))
    start.wait()
    try:
        result = expand(expander, *shard)
        results.put({"usage": result.usage, "error": None})
    except Exception as exc:  # CircuitOpen: reported, as the stage would raise it
        results.put({"usage": None, "error": type(exc).__name__})


def run_workers(server, tmp_path, shards, **overrides) -> list[dict]:
    """Each shard in its own spawned process, started together; returns what each reported."""
    config = {"base_url": server.base_url, "model": "fake-fundus-vl", "max_retries": 0, "timeout": 10,
              "concurrency": 4, **overrides}
    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Event(), spawn.Queue()
    workers = [spawn.Process(target=_expand_in_process, args=(config, str(tmp_path / "ledger.sqlite"), "run-1",
                                                              str(tmp_path / f"llm-{n}"), shard, start, results))
               for n, shard in enumerate(shards)]
    for w in workers:
        w.start()
    start.set()
    reports = [results.get(timeout=180) for _ in workers]
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    return reports


def request_count(shard) -> int:
    records, _, regions = shard
    return len(records) + len(regions)


def test_max_cost_binds_the_sum_of_two_worker_processes(halves, server, tmp_path):
    server.tokens_per_image = 25_000  # billed like OpenAI bills a 1024-px image: unknown before an answer
    probe = run_workers(server, tmp_path / "probe", halves[:1], prices=HEAVY.model_dump())[0]["usage"]
    per_request = probe["cost_usd"] / probe["requests"]
    server.reset()
    server.tokens_per_image = 25_000
    max_cost = per_request * 6  # about a third of all the requests; each half alone has more than 6
    assert min(request_count(h) for h in halves) > 6
    reports = run_workers(server, tmp_path / "run", halves, prices=HEAVY.model_dump(), max_cost=max_cost,
                          concurrency=8)
    usage = [r["usage"] for r in reports]
    spent = sum(u["cost_usd"] for u in usage)
    assert 0 < spent <= max_cost + 1e-12  # per-process ledgers would each spend up to max_cost
    assert sum(u["requests"] for u in usage) == server.count() >= 2
    assert sum(u["requests"] + u["not_sent_budget"] for u in usage) == sum(request_count(h) for h in halves)
    assert all(u["not_sent_budget"] > 0 for u in usage)  # both workers were stopped by the one budget


def test_the_circuit_breaker_opens_for_every_worker_process(halves, server, tmp_path):
    server.inject("server_error", times=None)
    reports = run_workers(server, tmp_path, halves, circuit_breaker=3, concurrency=1)
    assert [r["error"] for r in reports] == ["CircuitOpen", "CircuitOpen"]
    # The run's breaker: 3 failures, plus at most the one request the other worker had in flight.
    # Two per-process breakers would need 3 failures each.
    assert 3 <= server.count("server_error") <= 4
    server.reset()
    late = run_workers(server, tmp_path, halves[:1], circuit_breaker=3)  # a worker joining the run later
    assert late[0]["error"] == "CircuitOpen" and server.count() == 0


def test_a_reservation_is_atomic_across_connections(tmp_path):
    """Threads, each with its own connection to the file, reserve against one budget: the read and
    the update of a reservation have no one in between, so exactly as many fit as the budget holds."""
    config = OpenAIConfig(base_url="http://127.0.0.1:9/v1", model="m", max_cost=1.05,
                          prices=Prices(input_per_million=100_000.0, output_per_million=0.0))  # $0.10 a token
    held, refused = [], []

    def reserve_many():
        ledger = Ledger(config, tmp_path / "ledger.sqlite", "run-1")
        for _ in range(40):
            try:
                held.append(ledger.reserve(text_tokens=1, images=0, completion_tokens=0))
            except BudgetExhausted:
                refused.append(1)

    threads = [threading.Thread(target=reserve_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(held) == 10 and len(refused) == 150 and sum(held) == pytest.approx(1.0)
    other_run = Ledger(config, tmp_path / "ledger.sqlite", "run-2")  # a run of its own has its own budget
    assert other_run.reserve(text_tokens=1, images=0, completion_tokens=0) == pytest.approx(0.1)

"""When each shard-stage runs: every shard through every stage on the flow's task runner, each
reported as it ends.

A cluster's scheduler (Dask, Ray) is handed every shard-stage at once, each with the futures of
the stages before it on its shard, and starts a task when those are done. Prefect's thread pool
does not read a task's inputs: a task handed a future waits for it inside one of the pool's
threads, so with a thread per core the stages ran one after another. On the thread pool, a
shard-stage is therefore submitted only once the stage before it on its shard has finished, no
more at once than the pool has threads, in the order `pick` gives; so detect of one shard runs
beside crop of the shard before it and ingest of the one after.
"""
from __future__ import annotations

import queue
import time
from typing import Callable

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from fundus_engine.progress import BuildProgress
from fundus_engine.runner import STAGE_NAMES, Completion, Shard, StageOutcome

# Stages of which one shard runs at a time in a process: the threads share one detector, which
# predicts one batch at a time, so a second detect would only hold a thread while it waits.
ONE_AT_A_TIME = frozenset({"detect"})

ShardStage = tuple[str, int]  # (stage, shard number)
Submit = Callable[[str, Shard, dict], PrefectFuture]


def pick(ready: list[ShardStage], running: list[ShardStage]) -> ShardStage | None:
    """The shard-stage to start next: the latest stage first (a shard started is finished before
    more are started, so the stage files written are read soon and the records come out steadily),
    then the earliest shard; never a second of a stage in ONE_AT_A_TIME."""
    busy = {stage for stage, _ in running}
    allowed = [r for r in ready if not (r[0] in ONE_AT_A_TIME and r[0] in busy)]
    return max(allowed, key=lambda r: (STAGE_NAMES.index(r[0]), -r[1]), default=None)


def pool_threads(task_runner: TaskRunner) -> int | None:
    """The thread pool's size, or None for a runner that schedules by a task's inputs itself."""
    return getattr(task_runner, "_max_workers", None) if isinstance(task_runner, ThreadPoolTaskRunner) else None


def run_shards(shards: list[Shard], submit: Submit, task_runner: TaskRunner, progress: BuildProgress,
               logger) -> list[StageOutcome]:
    """Run every shard-stage (`submit(stage, shard, upstream)` submits one, `upstream` holding the
    completions, or on a cluster the futures, of the stages before it on its shard); returns how
    each ended, stage by stage in shard order. A stage that does not complete leaves the later
    stages of its shard "not run"."""
    threads = pool_threads(task_runner)
    by_number = {s.number: s for s in shards}
    upstream: dict[int, dict[str, Completion | PrefectFuture]] = {s.number: {} for s in shards}
    running: dict[int, ShardStage] = {}  # id(future) -> what it runs
    ready: list[ShardStage] = []
    outcomes: dict[ShardStage, StageOutcome] = {}
    ended: queue.SimpleQueue = queue.SimpleQueue()
    reporter = _Reporter(progress, logger)

    def start(stage: str, number: int) -> None:
        future = submit(stage, by_number[number], dict(upstream[number]))
        upstream[number][stage] = future
        running[id(future)] = (stage, number)
        future.add_done_callback(ended.put)

    if threads:
        ready = [(STAGE_NAMES[0], s.number) for s in shards]
    else:
        for s in shards:
            for stage in STAGE_NAMES:
                start(stage, s.number)
    while running or ready:
        while threads and len(running) < threads and (chosen := pick(ready, list(running.values()))):
            ready.remove(chosen)
            start(*chosen)
        future = ended.get()
        stage, number = running.pop(id(future))
        outcome = outcomes[stage, number] = _outcome(future, stage, number, logger)
        reporter.ended(outcome)
        if not threads:
            continue
        later = STAGE_NAMES[STAGE_NAMES.index(stage) + 1:]
        if outcome.completion and later:
            upstream[number][stage] = outcome.completion
            ready.append((later[0], number))
        elif not outcome.completion:
            for skipped in later:
                outcomes[skipped, number] = StageOutcome(stage=skipped, shard=number, state="not run")
                reporter.ended(outcomes[skipped, number])
    return [outcomes[stage, s.number] for stage in STAGE_NAMES for s in shards]


def _outcome(future: PrefectFuture, stage: str, shard: int, logger) -> StageOutcome:
    future.wait()  # the done callback may run before the future's final state is set
    state = future.state
    if state.is_completed():
        return StageOutcome(stage=stage, shard=shard, completion=future.result())
    if not state.is_final():  # the task runner gave it up: its worker died (past Dask's or Ray's retries)
        outcome = StageOutcome(stage=stage, shard=shard, state="crashed",
                               failure=f"lost by the task runner: {_runner_error(future)}")
        logger.warning("%s-%05d %s; the next run finishes it", stage, shard, outcome.failure)
        return outcome
    return StageOutcome(stage=stage, shard=shard, failure=state.message,
                        state="failed" if state.is_failed() else state.name.lower())


def _runner_error(future: PrefectFuture) -> str:
    """Why a cluster's future ended without a task run state (e.g. Dask's KilledWorker)."""
    wrapped = getattr(future, "wrapped_future", None)
    try:
        error = wrapped.exception(timeout=1) if hasattr(wrapped, "exception") else None
    except Exception as exc:  # the engine's own error, raised instead of returned
        error = exc
    return f"{type(error).__name__}: {error}" if error else "no result"


class _Reporter:
    """Progress as shard-stages end: the progress file the CLI's live display reads, and a log line
    per stage at most every few seconds (and when the stage is done)."""

    EVERY = 5.0  # seconds

    def __init__(self, progress: BuildProgress, logger):
        self.progress, self.logger, self.last_line = progress, logger, {}

    def ended(self, outcome: StageOutcome) -> None:
        done = outcome.completion
        line = self.progress.finished(outcome.stage, outcome.shard, len(done.rejects) if done else 0,
                                      cached=bool(done and done.reused))
        s = self.progress.stages[outcome.stage]
        if s.done == s.total or time.monotonic() - self.last_line.get(outcome.stage, 0) > self.EVERY:
            self.last_line[outcome.stage] = time.monotonic()
            self.logger.info(line)

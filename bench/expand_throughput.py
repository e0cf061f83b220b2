"""Expand-stage throughput against an OpenAI-compatible server with a fixed latency per request.

Run: `make bench-expand` (or `python bench/expand_throughput.py --images 16 --latency 0.2`).

The server runs in its own process on 127.0.0.1 so it does not share the client's GIL. Every
figure is measured in this run: the stage at `--concurrency`, the same requests sent one at a
time (the baseline), and a second run with unchanged prompts (served from the response cache).
Targets: >= 0.9 x (concurrency / latency) requests per second, >= 10x the sequential loop,
0 calls on the re-run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from fundus_engine.config import OpenAIConfig
from fundus_engine.expand import expand
from fundus_engine.expand_openai import OpenAIExpander
from fundus_engine.testing.openai_server import serve_in_subprocess
from fundus_engine.testing.shards import prepared_shard


os.environ.setdefault("FUNDUS_BENCH_API_KEY", "not-a-secret")  # the loopback server takes any key


def timed_run(base_url: str, shard, cache_dir: Path, concurrency: int, cache: bool) -> tuple[float, dict]:
    config = OpenAIConfig(base_url=base_url, model="fake-fundus-vl", concurrency=concurrency, cache=cache,
                          max_retries=0, timeout=30, api_key_env="FUNDUS_BENCH_API_KEY")
    expander = OpenAIExpander(config, cache_dir=cache_dir)
    started = time.perf_counter()
    result = expand(expander, *shard)
    seconds = time.perf_counter() - started
    if result.rejects:
        raise RuntimeError(f"benchmark requests failed: {result.rejects[:3]}")
    return seconds, result.usage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="synthetic images (each is 1 + regions requests)")
    ap.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fundus-bench-") as tmp:
        tmp = Path(tmp)
        shard = prepared_shard(tmp / "input", tmp / "out", args.images, seed=4242)
        with serve_in_subprocess(latency=args.latency) as base_url:
            timed_run(base_url, shard, tmp / "warm", args.concurrency, cache=False)  # imports, connections
            concurrent_s, usage = timed_run(base_url, shard, tmp / "llm", args.concurrency, cache=True)
            sequential_s, seq_usage = timed_run(base_url, shard, tmp / "seq", 1, cache=False)
            rerun_s, rerun_usage = timed_run(base_url, shard, tmp / "llm", args.concurrency, cache=True)

    n = usage["requests"]
    ideal = args.concurrency / args.latency
    rps, seq_rps = n / concurrent_s, seq_usage["requests"] / sequential_s
    rows = [
        ("requests per run", f"{n}", ""),
        (f"concurrency {args.concurrency}", f"{rps:.1f} req/s ({concurrent_s:.2f} s)",
         f"{rps / ideal:.2f} x ideal {ideal:.0f} req/s (target >= 0.90)"),
        ("sequential loop (baseline)", f"{seq_rps:.1f} req/s ({sequential_s:.2f} s)",
         f"speed-up {rps / seq_rps:.1f} x (target >= 10)"),
        ("re-run, unchanged prompts", f"{rerun_usage['requests']} calls, {rerun_usage['cache_hits']} cache hits "
         f"({rerun_s:.2f} s)", "target 0 calls"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:<32}  {ratio}")
    ok = rps / ideal >= 0.9 and rps / seq_rps >= 10 and rerun_usage["requests"] == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

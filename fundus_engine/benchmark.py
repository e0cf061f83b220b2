"""Kept until flows/ and runner.py import from mcq."""
from fundus_engine.mcq import build_benchmark, write_benchmark  # noqa: F401

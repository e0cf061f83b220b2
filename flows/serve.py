"""Serve the `build-fundusgen` deployment: `python -m flows.serve` or `fundus-engine serve`.

With no name, `flow.serve()` names the deployment after the flow, so runs are started with
`prefect deployment run build-fundusgen/build-fundusgen -p input_dir=... -p output_dir=...`.
"""
from __future__ import annotations

from flows.build_fundusgen import build_fundusgen


def serve(limit: int | None = None) -> None:
    build_fundusgen.serve(limit=limit, print_starting_message=True)


if __name__ == "__main__":
    serve()

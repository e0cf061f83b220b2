"""JSON Schemas of the row models, exported to `schemas/` for consumers that do not run Python.

`python -m fundus_engine.schemas [DIR]` writes them to DIR (default `schemas/` in the current
folder: the repository's, when run by `make schemas`; never into an installed package); a test
fails when the repository's files drift from the models.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from fundus_engine.config import BuildConfig
from fundus_engine.models import (Anatomy, Detection, Expansion, ImageFindings, ImageRecord, InstructionRecord, Region,
                                  RegionFindings, Reject, BenchmarkQuestion)

EXPORTED: dict[str, type[BaseModel]] = {
    "image_record": ImageRecord,
    "detection": Detection,
    "anatomy": Anatomy,
    "region": Region,
    "expansion": Expansion,
    "instruction_record": InstructionRecord,
    "reject": Reject,
    "image_findings": ImageFindings,  # what the openai backend asks a model for
    "region_findings": RegionFindings,
    "benchmark_question": BenchmarkQuestion,
    "build_config": BuildConfig,
}


def rendered() -> dict[str, str]:
    return {f"{name}.schema.json": json.dumps(model.model_json_schema(by_alias=True), indent=2, sort_keys=True) + "\n"
            for name, model in EXPORTED.items()}


def export(target: Path) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered().items():
        (target / name).write_text(text)
        written.append(target / name)
    return written


if __name__ == "__main__":
    for path in export(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")):
        print(path)

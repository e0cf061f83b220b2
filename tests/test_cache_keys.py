"""A stage's cache key covers every package module its result depends on."""
from __future__ import annotations

from pathlib import Path

import fundus_engine
from fundus_engine.runner import import_closure as _import_closure

ROOT = Path(fundus_engine.__file__).parent


def test_code_fingerprints_follow_each_stage_modules_imports():
    # modules a hand-kept list once missed: the consistency flags' report_scoring.py, the prompt renderer
    assert {"expand", "expand_openai", "llm_client", "llm_ledger", "llm_cache", "llm_consistency", "report_scoring",
            "redaction", "prompts", "evidence", "models", "vocabulary"} <= _import_closure("expand", ROOT)
    assert {"crop", "landmarks", "evidence", "decoding", "models"} <= _import_closure("crop", ROOT)
    assert {"ingest", "fundus_check", "synth"} <= _import_closure("ingest", ROOT)
    assert "yolo" not in _import_closure("crop", ROOT)  # a detector change does not re-run crop by code


def test_the_closure_reads_imports_inside_functions_too(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from fundus_engine.b import g\n    import fundus_engine.c\n")
    (tmp_path / "b.py").write_text("from fundus_engine import d\n")
    (tmp_path / "c.py").write_text("")
    (tmp_path / "d.py").write_text("import os\n")
    assert _import_closure("a", tmp_path) == {"a", "b", "c", "d"}

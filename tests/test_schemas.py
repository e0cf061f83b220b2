from pathlib import Path

from fundus_engine.schemas import EXPORTED, rendered

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"  # the repository's copy


def test_exported_json_schemas_match_the_models():
    expected = rendered()
    assert set(expected) == {f"{name}.schema.json" for name in EXPORTED}  # one file per exported model
    for name, text in expected.items():
        path = SCHEMAS_DIR / name
        assert path.is_file(), f"{path} missing: run python -m fundus_engine.schemas"
        assert path.read_text() == text, f"{path} drifted from its model: run python -m fundus_engine.schemas"
    stale = {p.name for p in SCHEMAS_DIR.glob("*.json")} - set(expected)
    assert not stale, f"schemas with no model: {stale}"


def test_instruction_record_schema_uses_the_sharegpt_from_key():
    import json

    schema = json.loads((SCHEMAS_DIR / "instruction_record.schema.json").read_text())
    turn = schema["$defs"]["Turn"]
    assert set(turn["required"]) == {"from", "value"}
    assert turn["properties"]["from"]["enum"] == ["human", "gpt"]

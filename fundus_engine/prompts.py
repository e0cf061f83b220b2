"""Versioned prompt templates: Jinja2 bodies with YAML front matter (id, version, task, ...).

A template's sha256 joins the cache key of the stage that renders it, so editing one template
re-runs exactly the work that depends on it.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import jinja2
import yaml

from fundus_engine.vocabulary import chinese


def _default_prompts_dir() -> Path:
    """The repo's prompts/ in a checkout or editable install (where users edit them); the copy
    shipped in the wheel as fundus_engine.prompt_templates otherwise."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "prompts"
    return checkout if checkout.is_dir() else here / "prompt_templates"


PROMPTS_DIR = Path(os.environ.get("FUNDUS_PROMPTS_DIR") or _default_prompts_dir())


@dataclass(frozen=True)
class Prompt:
    id: str
    version: str
    sha256: str
    meta: dict = field(hash=False)
    template: jinja2.Template = field(hash=False, repr=False)

    def render(self, **context) -> str:
        return self.template.render(**context).strip()

    def module(self, **context):
        """The template's macros, for prompts that define several named pieces."""
        return self.template.make_module(context)


def dd_from(distance_dd: float, what: str) -> str:
    """A measured distance in words, to the 0.1 DD it is stated in: under 0.05 DD is "within
    0.1 disc diameters of" (never "at" or "over": a fovea is placed to about 0.1-0.2 DD)."""
    if distance_dd < 0.05:
        return f"within 0.1 disc diameters of {what}"
    tenths = Decimal(str(distance_dd)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)  # 0.25 is 0.3, as read
    return f"{tenths} disc diameters from {what}"


def placement(facts: dict) -> str:
    """Where a lesion class lies, from `chain.group_facts`: ", mostly in the X quadrant" (over
    half of its boxes), ", all in ...", ", in all four quadrants", ", in the X and Y quadrants"."""
    if facts["quadrant"]:
        share = "in" if facts["count"] == 1 else "all in" if facts["quadrant_share"] == "all" else "mostly in"
        return f", {share} the {facts['quadrant']} quadrant"
    quadrants = facts["quadrants"]
    if len(quadrants) == 4:
        return ", in all four quadrants"
    if len(quadrants) > 1:
        return f", in the {', '.join(quadrants[:-1])} and {quadrants[-1]} quadrants"
    return ""


_env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                          keep_trailing_newline=False)
_env.filters["zh"] = chinese
_env.filters["dd_from"] = dd_from
_env.filters["placement"] = placement


@functools.cache
def _load(path: Path, mtime_ns: int) -> Prompt:
    text = path.read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"{path}: a prompt file starts with '---' front matter (id, version)")
    try:
        head, body = text[4:].split("\n---\n", 1)
        meta = yaml.safe_load(head) or {}
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: unreadable front matter: {exc}") from exc
    for key in ("id", "version"):
        if key not in meta:
            raise ValueError(f"{path}: front matter lacks '{key}'")
    try:
        template = _env.from_string(body)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{path}:{exc.lineno}: template error: {exc.message}") from exc
    return Prompt(id=str(meta["id"]), version=str(meta["version"]), sha256=hashlib.sha256(text.encode()).hexdigest(),
                  meta=meta, template=template)


def load(name: str, prompts_dir: Path | None = None) -> Prompt:
    """Load `prompts/<name>.j2`; reloaded when the file changes."""
    path = Path(prompts_dir or PROMPTS_DIR) / f"{name}.j2"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt template not found")
    return _load(path.resolve(), path.stat().st_mtime_ns)


def load_dir(subdir: str, prompts_dir: Path | None = None) -> list[Prompt]:
    root = Path(prompts_dir or PROMPTS_DIR) / subdir
    return [load(f"{subdir}/{p.stem}", prompts_dir) for p in sorted(root.glob("*.j2"))]


def fingerprint(prompts: list[Prompt]) -> str:
    return hashlib.sha256("".join(sorted(p.sha256 for p in prompts)).encode()).hexdigest()

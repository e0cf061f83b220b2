"""A non-editable install (`pip install .`) carries the prompts and the demo detector."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_prompt_folder_is_packaged():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p.parent.relative_to(ROOT / "prompts") for p in (ROOT / "prompts").rglob("*.j2")}
    expected = {".".join(("fundus_engine.prompt_templates", *folder.parts)) for folder in folders}
    assert expected <= set(setuptools["packages"])
    assert expected <= set(setuptools["package-data"])


@pytest.mark.slow
def test_wheel_runs_the_chain_from_its_own_prompts(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(tmp_path / "wheel")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "wheel").glob("fundus_engine-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in (ROOT / "prompts").rglob("*.j2"):
        assert f"fundus_engine/prompt_templates/{template.relative_to(ROOT / 'prompts')}" in names
    assert "fundus_engine/weights/demo_detector.pt" in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    code = ("from fundus_engine import chain, prompts; import sys; "
            "assert 'site' in str(prompts.PROMPTS_DIR), prompts.PROMPTS_DIR; "
            "print(sorted(chain.templates()))")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    from fundus_engine import chain

    assert out.stdout.strip() == str(sorted(chain.templates()))  # every task family, as in the checkout
    assert "'grounded_report'" in out.stdout

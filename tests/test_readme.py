"""The README's config examples are what users copy: each must validate against its model."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from fundus_engine.config import TrainDetectorParams
from fundus_engine.config import BuildConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_yaml_example_in_the_readme_validates():
    blocks = re.findall(r"```yaml\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        data = yaml.safe_load(block)
        model = TrainDetectorParams if "output" in data else BuildConfig
        model.model_validate(data)


def test_readme_refuge_example_maps_both_classes_onto_one_folder():
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if "REFUGE" in b)
    refuge = next(m for m in TrainDetectorParams.model_validate(yaml.safe_load(block)).masks if "REFUGE" in m.images)
    assert refuge.levels == {"optic_disc": [0, 128], "optic_cup": [0]}
    assert refuge.masks["optic_disc"] == refuge.masks["optic_cup"]

"""Build configuration: one pydantic model, one section per stage.

Each stage's cache key hashes only its own section, so changing, say, the chain seed never
re-runs detection.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestConfig(Section):
    labels: str | None = Field(None, description="labels manifest (JSON or CSV); default: labels.json or labels.csv in the input folder")
    min_side: int = Field(256, ge=32, description="images with a shorter side are rejected")
    min_fov_coverage: float = Field(0.2, ge=0, le=1, description="frames with less retina than this are rejected")
    min_sharpness: float = Field(2.0, ge=0, description="below this the photograph is graded poor")


class DetectConfig(Section):
    weights: str | None = Field(None, description="YOLO weights (.pt); default: the demo detector shipped in the package")
    confidence: float = Field(0.25, gt=0, lt=1)
    iou: float = Field(0.5, gt=0, lt=1)
    imgsz: int = Field(512, ge=64)
    batch: int = Field(16, ge=1)
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:0', ...")
    ground_truth: Literal["prefer", "ignore"] = Field(
        "prefer", description="use boxes from the labels manifest instead of predictions where an image has them")


class CropConfig(Section):
    context: float = Field(0.5, ge=0, le=3, description="padding around a box, as a fraction of its size")
    min_crop_px: int = Field(64, ge=8, description="crops are at least this wide and high")
    jpeg_quality: int = Field(92, ge=50, le=100)


class ExpandConfig(Section):
    backend: Literal["offline"] = "offline"


class ChainConfig(Section):
    seed: int = 0
    max_region_questions: int = Field(4, ge=0, description="region identification/detection questions per image")


class WriteConfig(Section):
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    rows_per_file: int = Field(20000, ge=100)


class BuildConfig(Section):
    shard_size: int = Field(64, ge=1, description="images per unit of work")
    prompts_dir: str | None = Field(None, description="prompt templates folder; default: the project's prompts/")
    ingest: IngestConfig = IngestConfig()
    detect: DetectConfig = DetectConfig()
    crop: CropConfig = CropConfig()
    expand: ExpandConfig = ExpandConfig()
    chain: ChainConfig = ChainConfig()
    write: WriteConfig = WriteConfig()

    @classmethod
    def load(cls, path: str | Path | None) -> "BuildConfig":
        if path is None:
            return cls()
        path = Path(path)
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        try:
            return cls.model_validate(data or {})
        except Exception as exc:
            raise ValueError(f"{path}: invalid configuration: {exc}") from exc

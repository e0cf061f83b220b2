"""Configuration: a build's (one pydantic model, one section per stage) and the detector
training's (`TrainDetectorParams`).

Each stage's cache key hashes only its own section, so changing, say, the chain seed never
re-runs detection.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestConfig(Section):
    labels: str | None = Field(None, description="labels manifest (JSON or CSV); default: labels.json or labels.csv in the input folder")
    min_side: int = Field(256, ge=32, description="images with a shorter side are rejected")
    max_pixels: int = Field(60_000_000, ge=1, description="images with more pixels are rejected from their header, "
                            "before decoding (a decompression bomb would exhaust memory); fundus cameras "
                            "take 5-24 MP")
    min_fov_coverage: float = Field(0.2, ge=0, le=1, description="frames with less retina than this are rejected")
    min_sharpness: float = Field(2.0, ge=0, description="below this the photograph is graded poor")
    patient_key_env: str = Field(
        "FUNDUS_ENGINE_PATIENT_KEY", description="environment variable holding the secret (16 characters or more) "
        "that keys patient pseudonyms (HMAC-SHA256); unset, they are plain digests, which an identifier from a small "
        "space (a record number) can be matched to by hashing candidates, and the build warns")
    label_layouts: list[str] = Field(
        [], description="folders of photographs with masks in a public layout (IDRiD, DDR, FGADR, e-ophtha, "
                        "images/<DATASET> + masks/<DATASET>, YOLO): their boxes join the labels of the same photographs "
                        "in the input folder (matched by content), and each dataset's mask classes count as annotated")
    annotated_classes: list[str] | None = Field(
        None, description="classes the manifest's boxes annotate exhaustively (an image's missing box means "
                          "absent); default: every class that has a box anywhere in the manifest")

    @field_validator("annotated_classes")
    @classmethod
    def _known_classes(cls, names: list[str] | None) -> list[str] | None:
        from fundus_engine.vocabulary import canonical_class

        return None if names is None else sorted({canonical_class(n) for n in names})


class DetectConfig(Section):
    weights: str | None = Field(None, description="YOLO weights (.pt); default: the demo detector shipped in the package")
    confidence: float = Field(0.25, gt=0, lt=1)
    iou: float = Field(0.5, gt=0, lt=1)
    imgsz: int = Field(512, ge=64)
    batch: int = Field(16, ge=1)
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:0', ...")
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="what runs the detector: PyTorch on the .pt weights, or ONNX Runtime or OpenVINO on an "
                            "export of them (made once, offline, and cached beside the weights by content hash). "
                            "auto: the fastest installed for the device (CPU: openvino, else onnx, else torch; "
                            "GPU: torch). Boxes differ between backends by a fraction of a pixel")
    ground_truth: Literal["prefer", "ignore"] = Field(
        "prefer", description="use boxes from the labels manifest instead of predictions where an image has them")
    out_of_domain: Literal["drop", "keep"] = Field(
        "drop", description="predicted lesion and cup boxes of classes the detector was never validated on for "
                            "the image's domain (real or synthetic photographs, from the weights metadata): drop "
                            "them (default), or keep them as findings. Disc and fovea boxes are always kept and "
                            "checked against the image-analysis localiser at crop")


class CropConfig(Section):
    context: float = Field(0.5, ge=0, le=3, description="padding around a box, as a fraction of its size")
    min_crop_px: int = Field(64, ge=8, description="crops are at least this wide and high")
    jpeg_quality: int = Field(92, ge=50, le=100)
    localise: Literal["when_needed", "always"] = Field(
        "when_needed", description="the image-analysis localiser of the optic disc and fovea: `when_needed` runs "
        "it only on photographs where labels or a detector trusted on that kind of photograph do not already give "
        "both (there its cross-check would change nothing but the provenance, `detector+localiser`, and ~70 ms of "
        "CPU per photograph); `always` runs it on every photograph, to record where the two agree")


class Prices(Section):
    """USD per million tokens, for the run's cost estimate and the `max_cost` stop."""

    input_per_million: float = Field(0.0, ge=0)
    output_per_million: float = Field(0.0, ge=0)


class OpenAIConfig(Section):
    """An OpenAI-compatible chat-completions server: OpenAI, vLLM, SGLang, Ollama, LM Studio, ..."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # a refused URL may hold a key

    base_url: str = Field("https://api.openai.com/v1", description="the server's /v1 URL")
    model: str = "gpt-4o-mini"
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key; "
                             "the key itself never goes into config, logs or outputs")
    temperature: float | None = Field(None, ge=0, le=2, description="overrides the prompt's front matter")
    max_tokens: int | None = Field(None, ge=16, description="overrides the prompt's front matter")
    timeout: float = Field(60.0, gt=0, description="seconds per request attempt")
    max_retries: int = Field(4, ge=0, description="retries on 429 (honouring Retry-After), 5xx, timeouts")
    concurrency: int = Field(8, ge=1, description="requests in flight per expand shard-stage task (the run has as many tasks at once as its runner has workers)")
    image_max_side: int = Field(1024, ge=64, description="images are resized to this longest side before sending")
    response_format: Literal["auto", "json_schema", "json_object", "text"] = Field(
        "auto", description="auto: JSON schema, falling back to JSON mode, then text, as the server allows")
    prices: Prices = Prices()
    max_cost: float | None = Field(None, gt=0, description="USD; requests that could exceed it are not sent")
    circuit_breaker: int = Field(5, ge=1, description="consecutive failed requests that stop the run")
    cache: bool = Field(True, description="reuse earlier responses to identical requests")
    cache_dir: str | None = Field(None, description="response cache; default OUT/.cache/llm (share it across runs)")
    regions: Literal["all", "lesions"] = Field("all", description="which regions get their own request")

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        """The config is a flow parameter, which Prefect stores and shows: a key in the URL would leak."""
        from urllib.parse import urlsplit

        from fundus_engine.redaction import secret_query_parameters

        parts = urlsplit(url)
        if parts.username or parts.password or secret_query_parameters(url):
            raise ValueError("base_url must not carry credentials (user:key@ or a key parameter); "
                             "put the key in the environment variable named by api_key_env")
        return url


class ExpandConfig(Section):
    backend: Literal["offline", "openai"] = "offline"
    openai: OpenAIConfig = OpenAIConfig()
    drop_flagged: bool = Field(False, description="leave out records whose description contradicts the detections")
    negative_min_map50: float = Field(
        0.5, ge=0, le=1, description="a lesion class is stated absent from an unlabelled image only when the "
                                     "detector's held-out mAP50 for it (weights metadata) reaches this")

    def result_relevant(self) -> dict:
        """The part of this section that can change what the stage writes (its cache key)."""
        operational = {"api_key_env", "timeout", "max_retries", "concurrency", "prices", "max_cost",
                       "circuit_breaker", "cache", "cache_dir"}
        data = self.model_dump(exclude={"openai": operational})
        if self.backend == "offline":
            data.pop("openai")
        return data


class ChainConfig(Section):
    seed: int = 0
    max_region_questions: int = Field(4, ge=0, description="region identification/detection questions per image")
    max_finding_questions: int = Field(4, ge=0, description="presence questions per image, half about absent lesions")
    max_attribute_questions: int = Field(2, ge=0, description="size/position/colour questions per image")
    languages: list[Literal["en", "zh"]] = Field(["en"], min_length=1,
                                                 description="zh adds Chinese records for the short-answer tasks")


class WriteConfig(Section):
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    near_duplicate_bits: int = Field(20, ge=0, le=64, description="images whose perceptual hashes differ in at most "
                                     "this many of 256 bits are near-duplicates and share a split (0: exact only)")
    rows_per_file: int = Field(20000, ge=100)
    image_paths: Literal["auto", "source", "content"] = Field(
        "auto", description="where the dataset, benchmark and exports say the photographs are: `source`, the "
        "paths the build read them from; `content`, copies named by content hash under OUT/images (hard links "
        "where possible), for source file names or folders that carry patient identifiers; `auto`, `content` when "
        "the path of a photograph holds its patient's identifier as the labels give it, else `source`")


class RunnerConfig(Section):
    """What runs the shard-stages: it never changes the result, so it is in no stage's cache key."""

    kind: Literal["thread", "dask", "ray"] = Field(
        "thread", description="thread: a thread pool in the flow's process; dask: Prefect's DaskTaskRunner "
                              "(prefect-dask), worker processes on one machine or many; ray: Prefect's "
                              "RayTaskRunner (prefect-ray). dask and ray need the `scale` extra")
    address: str | None = Field(
        None, description="an existing cluster: a Dask scheduler (tcp://host:8786) or a Ray cluster address "
                          "(host:6379, ray://host:10001, auto); None: a local cluster started for the run")
    workers: int | None = Field(
        None, ge=1, description="thread: threads; dask/ray with no address: worker processes of the local "
                                "cluster (default: the CPU count)")


class BuildConfig(Section):
    shard_size: int = Field(64, ge=1, description="images per unit of work")
    prompts_dir: str | None = Field(None, description="prompt templates folder; default: the project's prompts/")
    ingest: IngestConfig = IngestConfig()
    detect: DetectConfig = DetectConfig()
    crop: CropConfig = CropConfig()
    expand: ExpandConfig = ExpandConfig()
    chain: ChainConfig = ChainConfig()
    write: WriteConfig = WriteConfig()
    runner: RunnerConfig = RunnerConfig()

    @classmethod
    def load(cls, path: str | Path | None) -> "BuildConfig":
        if path is None:
            return cls()
        data = read_config_file(path)
        try:
            return cls.model_validate(data)
        except Exception as exc:
            raise ValueError(f"{path}: invalid configuration: {exc}") from exc


def read_config_file(path: str | Path) -> dict:
    """A YAML or JSON config file's mapping; anything else is a ValueError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{path}: cannot read the configuration: {reason}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a configuration is a mapping of settings, not a {type(data).__name__}")
    return data


# ------------------------------------------------------------------ detector training

class CocoSource(Section):
    annotations: str = Field(description="COCO detection JSON")
    images: str | None = Field(None, description="image folder; default: beside the JSON")


class MaskSource(Section):
    images: str = Field(description="image folder (IDRiD, DDR, e-ophtha, DiaretDB1 ...)")
    masks: dict[str, str] = Field(description="class name or alias (EX, HE, MA, SE, OD ...) -> folder of binary masks")
    min_area: int = Field(4, ge=1, description="components smaller than this many pixels are dropped")
    merge_distance: float | None = Field(None, ge=0, description="fragments closer than this (pixels) become one box")
    max_boxes: int | None = Field(None, ge=1, description="per image and class, keep only the largest boxes")
    levels: dict[str, list[int]] = Field({}, description="mask key -> pixel values of that class, for multi-level "
                                         "masks; REFUGE: {'optic_disc': [0, 128], 'optic_cup': [0]}")


class TrainDetectorParams(Section):
    output: str = Field(description="weights file to write (.pt); the metadata JSON goes beside it")
    datasets: list[str] = Field([], description="folders in a public layout, recognised by their naming: IDRiD "
                                "segmentation, DDR, FGADR, e-ophtha, images/<DATASET> + masks/<DATASET>/<id>__<class>.png "
                                "(fundus_engine.layouts)")
    yolo: list[str] = Field([], description="YOLO-format folders (images/ + labels/, or with a dataset.yaml)")
    coco: list[CocoSource] = []
    masks: list[MaskSource] = []
    synthetic: int = Field(0, ge=0, description="synthetic photographs to add")
    synthetic_seed: int = 1000
    held_out: str | None = Field(None, description="dataset.yaml to validate on; default: the val split")
    unlabelled: str | None = Field(None, description="folder of unlabelled images for self-training")
    self_training_rounds: int = Field(0, ge=0)
    pseudo_label_confidence: float = Field(0.5, gt=0, lt=1)
    epochs: int = Field(30, ge=1)
    imgsz: int = Field(512, ge=64)
    batch: int = Field(16, ge=1)
    base_model: str = Field("yolo11n.yaml", description="a model .yaml (from scratch) or local .pt weights")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="held out of training, per domain (real, synthetic)")
    folds: int = Field(0, ge=0, description="k-fold cross-validation by image on the real photographs (k >= 2): "
                       "k detectors, each validated on the fold it did not see, then the written one trained on all "
                       "real images; 0: one held-out split of val_fraction")
    seed: int = 0

    @model_validator(mode="after")
    def _folds_fit(self):
        if self.folds == 1:
            raise ValueError("folds: 1 is no cross-validation; give 0 (one held-out split) or at least 2")
        if self.folds and self.held_out:
            raise ValueError("folds cross-validates on the labelled real photographs; held_out names another "
                             "validation set: give one or the other")
        if self.folds and self.self_training_rounds:
            raise ValueError("self-training rounds are not cross-validated: use folds: 0 with self_training_rounds")
        return self

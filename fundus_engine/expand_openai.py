"""The `openai` expand backend: a multimodal model behind any OpenAI-compatible server
describes each image and each region, in validated structured output.

This module is the task: it renders the prompts into requests and turns the answers into
Expansion rows. Sending them (cache, budget, retries, circuit breaker, redaction) is the
transport's job, `fundus_engine.llm_client`.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from pydantic import BaseModel

from fundus_engine import __version__
from fundus_engine.config import OpenAIConfig
from fundus_engine.evidence import DetectorEvidence, area_classes, assessed_lesions, counted_lesions
from fundus_engine.photo_files import cached_sha256
from fundus_engine.quality import stated_grade
from fundus_engine.llm_cache import ResponseCache
from fundus_engine.llm_client import LLMClient, Request, RequestFailed
from fundus_engine.llm_consistency import consistency_flags
from fundus_engine.llm_ledger import BudgetExhausted, CircuitOpen, Ledger
from fundus_engine.models import (Anatomy, Expansion, ImageDescription, ImageFindings, ImageRecord, Provenance,
                                  Region, RegionDescription, RegionFindings, Reject)
from fundus_engine.prompts import Prompt, load
from fundus_engine.redaction import redact_secrets
from fundus_engine.vocabulary import BY_NAME, LESIONS

STAGE = "expand"
OUTPUT_MODELS: dict[str, type[BaseModel]] = {"ImageFindings": ImageFindings, "RegionFindings": RegionFindings}


def facts_of(region: Region, record: ImageRecord) -> dict:
    """A region's measured facts; a box made from a mask says it may hold several lesions."""
    facts = {"label": region.label, "name": region.display, "box_0_999": region.box_999,
             "confidence": round(region.confidence, 2), "source": region.source, "size_dd": region.size_dd,
             "fovea_distance_dd": region.fovea_distance_dd, "nearest_point_to_fovea_dd": region.fovea_reach_dd,
             "clock_hour": region.clock_hour, "quadrant": region.quadrant}
    if region.label in LESIONS:  # measured against the retina around it, not named on its own
        facts["colour_against_surrounding_retina"] = region.colour
    else:
        facts["colour"] = region.colour
    if region.label in area_classes(record, [region]):
        facts["area_of_one_or_more_lesions"] = True
    return facts


def image_facts(record: ImageRecord, anatomy: Anatomy, regions: list[Region]) -> dict:
    """The measured facts the model is given. Boxes made from masks (`clustered_classes`) may each
    hold several lesions: they are given as areas, not as a count of lesions."""
    area_labels = area_classes(record, regions)
    lesions = Counter(r.display for r in regions if r.label in LESIONS and r.label not in area_labels)
    areas = Counter(r.display for r in regions if r.label in area_labels)
    facts = {"laterality": anatomy.laterality, "diagnosis": record.diagnosis, "grade": record.grade,
             "cup_to_disc": anatomy.cup_to_disc, "quality": stated_grade(record), "lesion_counts": dict(lesions)}
    if areas:
        facts["lesion_areas_of_one_or_more_lesions"] = dict(areas)
    return {**facts, "regions": [facts_of(r, record) for r in regions]}


class OpenAIExpander:
    """Describes images and regions with a model behind an OpenAI-compatible API."""

    name = "openai"

    def __init__(self, config: OpenAIConfig, prompts_dir: str | None = None, cache_dir: Path | None = None,
                 run_id: str | None = None, evidence: DetectorEvidence = DetectorEvidence(),
                 ledger_path: Path | None = None):
        """`ledger_path`: the run's ledger file, shared by every process of the run (`run_id`);
        without it the budget and breaker span this expander only."""
        self.config = config
        self.evidence = evidence
        self.image_prompt = load("expand/openai_image", prompts_dir)
        self.region_prompt = load("expand/openai_region", prompts_dir)
        self.prompts = [self.image_prompt, self.region_prompt]
        self.ledger = Ledger(config, ledger_path, run_id)
        cache = ResponseCache(Path(config.cache_dir or cache_dir or ".fundus-llm-cache"), read=config.cache)
        self.llm = LLMClient(config, self.ledger, cache)

    def provenance(self) -> Provenance:
        p, r = self.image_prompt, self.region_prompt
        return Provenance(backend=self.name, model=self.config.model, prompt_id=p.id, prompt_version=p.version,
                          prompt_sha256=p.sha256, engine_version=__version__, region_prompt_id=r.id,
                          region_prompt_version=r.version, region_prompt_sha256=r.sha256)

    # requests ---------------------------------------------------------------------------

    def _request(self, prompt: Prompt, item: str, images: list[str], image_hashes: list[str], **context) -> Request:
        macros = prompt.module(knowledge=BY_NAME)
        sampling = {"temperature": prompt.meta.get("sampling", {}).get("temperature", 0.2),
                    "max_tokens": prompt.meta.get("sampling", {}).get("max_tokens", 800)}
        if self.config.temperature is not None:
            sampling["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            sampling["max_tokens"] = self.config.max_tokens
        request = Request(item=item, prompt=prompt, output=OUTPUT_MODELS[prompt.meta["output_model"]],
                          system=str(macros.system()).strip(), text=str(macros.user(**context)).strip(),
                          images=images, sampling=sampling)
        request.key = self.llm.cache_key(request, image_hashes)
        return request

    def image_request(self, record: ImageRecord, anatomy: Anatomy, regions: list[Region]) -> Request:
        return self._request(self.image_prompt, record.sha256, [record.path], [record.sha256], record=record,
                             anatomy=anatomy, regions=[r for r in regions if r.label in LESIONS],
                             facts=image_facts(record, anatomy, regions))

    def region_request(self, record: ImageRecord, anatomy: Anatomy, region: Region) -> Request:
        wanted = self.region_prompt.meta.get("images", ["crop"])
        paths = [{"full": record.path, "crop": region.crop_path, "marked": region.marked_path}[w] for w in wanted]
        paths = [p for p in paths if p]
        return self._request(self.region_prompt, region.region_id, paths, [cached_sha256(p) for p in paths],
                             record=record, anatomy=anatomy, region=region, facts=facts_of(region, record),
                             with_marked=bool(region.marked_path and "marked" in wanted))

    # the shard ----------------------------------------------------------------------------

    def expand_shard(self, items: list[tuple[ImageRecord, Anatomy, list[Region]]]):
        """Shards run side by side, in threads and processes: `concurrency` bounds the requests in
        flight per shard, the ledger binds budget and breaker for the whole run."""
        if self.ledger.circuit_open:
            raise CircuitOpen(self.llm.circuit_message())
        self.llm.reset_usage()
        result = asyncio.run(self._expand_all(items))
        result.usage = self.llm.usage_report()
        return result

    async def _expand_all(self, items):
        from fundus_engine.expand import ExpandResult

        regions_wanted = (lambda r: True) if self.config.regions == "all" else (lambda r: r.label in LESIONS)
        jobs = []
        for record, anatomy, regions in items:
            jobs.append((record, anatomy, regions, self.image_request(record, anatomy, regions),
                         [(r, self.region_request(record, anatomy, r)) for r in regions if regions_wanted(r)]))
        semaphore = asyncio.Semaphore(self.config.concurrency)
        async with self.llm.connect() as client:
            async def run(request):
                try:
                    return await self.llm.call(client, semaphore, request)
                except (RequestFailed, BudgetExhausted) as exc:
                    return exc

            flat = [req for job in jobs for req in (job[3], *(r for _, r in job[4]))]
            try:
                async with asyncio.TaskGroup() as group:  # a tripped breaker cancels what is still queued
                    tasks = [group.create_task(run(r)) for r in flat]
            except* CircuitOpen as tripped:
                raise tripped.exceptions[0] from None
            answers = {id(r): t.result() for r, t in zip(flat, tasks)}

        result = ExpandResult()
        for record, anatomy, regions, image_req, region_reqs in jobs:
            failures = [(req, answers[id(req)]) for req in (image_req, *(r for _, r in region_reqs))
                        if isinstance(answers[id(req)], Exception)]
            for req, exc in failures:
                result.complete = False
                result.rejects.append(Reject(stage=STAGE, item=req.item,
                                             reason=redact_secrets(f"{req.prompt.id}: {exc}", self.config.api_key_env),
                                             raw_output=redact_secrets(getattr(exc, "raw_output", None),
                                                                       self.config.api_key_env)))
            findings = answers[id(image_req)]
            if isinstance(findings, Exception):
                continue
            described = [RegionDescription(region_id=r.region_id, label=r.label, description=answers[id(req)].description,
                                           significance=answers[id(req)].significance)
                         for r, req in region_reqs if not isinstance(answers[id(req)], Exception)]
            result.expansions.append(self.expansion(record, anatomy, regions, findings, described))
        return result

    def expansion(self, record: ImageRecord, anatomy: Anatomy, regions: list[Region], findings: ImageFindings,
                  described: list[RegionDescription]) -> Expansion:
        if record.diagnosis:  # a source label outranks the model; disagreement is flagged below
            diagnosis, grade, source = record.diagnosis, record.grade, "label"
        else:
            diagnosis, grade, source = findings.diagnosis, findings.grade, "model"
        image = ImageDescription(overview=findings.overview, anatomy=findings.anatomy,
                                 positive_findings=findings.positive_findings,
                                 negative_findings=findings.negative_findings, diagnosis=diagnosis, grade=grade,
                                 diagnosis_source=source, evidence=findings.evidence or [findings.diagnosis])
        return Expansion(sha256=record.sha256, image=image, regions=described, provenance=self.provenance(),
                         flags=consistency_flags(findings, record, anatomy, regions),
                         assessed_lesions=assessed_lesions(record, self.evidence),
                         counted_lesions=counted_lesions(record, self.evidence))

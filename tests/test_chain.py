"""fundus_engine.chain: the six FundusExpert task types and the richer families, InternVL box
syntax, seeded templates, Chinese records."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from fundus_engine.chain import box_text, chain, grounded, group_facts, plural, templates
from fundus_engine.config import ChainConfig, CropConfig, ExpandConfig, IngestConfig
from fundus_engine.crop import box_999, crop, region_facts
from fundus_engine.detect import from_labels
from fundus_engine.evidence import DOMAINS, DetectorEvidence
from fundus_engine.expand import OfflineExpander, expand
from fundus_engine.ingest import ingest
from fundus_engine.labels import load_labels
from fundus_engine.photo_files import scan
from fundus_engine.models import Anatomy, ImageRecord, InstructionRecord, Point, Quality, Region
from fundus_engine.prompts import PROMPTS_DIR
from fundus_engine.synth import generate
from fundus_engine.vocabulary import AMD, BY_NAME, CLASS_NAMES, DR, DR_GRADES, LESIONS

TASKS = {"disease_diagnosis", "severity_grading", "region_identification", "region_detection", "report_generation",
         "grounded_report"}
FAMILIES = TASKS | {"cognitive_chain", "multi_turn", "finding_presence", "counting", "lesion_attribute"}
QUALITY = Quality(sharpness=40.0, exposure=0.3, fov_coverage=0.69, grade="good")
# Strict InternVL grounding: <ref>Name</ref><box>[[x1, y1, x2, y2], ...]</box>
BOX = r"\[\d{1,3}, \d{1,3}, \d{1,3}, \d{1,3}\]"
GROUNDED = re.compile(rf"<ref>([^<>]+)</ref><box>(\[{BOX}(?:, {BOX})*\])</box>")


def trusting(lesions) -> DetectorEvidence:
    """A detector validated on every class for both kinds of photograph, trusted on `lesions`."""
    return DetectorEvidence(validated={d: list(CLASS_NAMES) for d in DOMAINS},
                            trusted={d: list(lesions) for d in DOMAINS})


def _image(sha: str, patient: str, laterality: str, **labels):
    """A hand-made image with anatomy and regions; `lesions` are (label, xyxy, confidence)."""
    lesions = labels.pop("lesions", [])
    record = ImageRecord(sha256=sha, path=f"/data/{sha[:4]}.jpg", relpath=f"{sha[:4]}.jpg", width=400, height=400,
                         patient_id=patient, laterality=laterality, quality=QUALITY, **labels)
    nasal = 1 if laterality == "OD" else -1
    disc_x, fovea_x = 200 + nasal * 150, 200 - nasal * 100
    anat = Anatomy(sha256=sha, laterality=laterality, laterality_source="label", disc_centre=Point(x=disc_x, y=250),
                   disc_diameter_px=100.0, fovea_centre=Point(x=fovea_x, y=250), cup_to_disc=0.35)
    boxes = [("optic_disc", [disc_x - 50, 200, disc_x + 50, 300], 0.95),
             ("optic_cup", [disc_x - 17, 233, disc_x + 18, 268], 0.9),
             ("fovea", [fovea_x - 25, 225, fovea_x + 25, 275], 0.85)] + lesions
    regions, marked = [], set()
    for n, (label, xyxy, conf) in enumerate(boxes):
        regions.append(Region(
            sha256=sha, region_id=f"{sha[:12]}-{n:03d}", label=label, display=BY_NAME[label].display, xyxy=xyxy,
            box_999=box_999(xyxy, 400, 400), confidence=conf, source="model", crop_path=f"/crops/{sha[:4]}-{n}.jpg",
            marked_path=None if label in marked else f"/crops/{sha[:4]}-{n}.marked.jpg", mean_rgb=[150, 30, 20],
            colour="red", **region_facts(xyxy, anat)))
        marked.add(label)
    return record, anat, regions


@pytest.fixture(scope="module")
def images():
    dr_od = _image("11" * 32, "P1", "OD", diagnosis=DR, grade=DR_GRADES[2], dr_grade=2, lesions=[
        ("microaneurysm", [130, 170, 150, 190], 0.7), ("microaneurysm", [40, 330, 46, 336], 0.8),
        ("haemorrhage", [20, 260, 80, 300], 0.6), ("hard_exudate", [150, 300, 170, 312], 0.5)])
    dr_os = _image("22" * 32, "P1", "OS", diagnosis=DR, grade=DR_GRADES[1], dr_grade=1, lesions=[
        ("microaneurysm", [260, 170, 270, 180], 0.6)])
    amd = _image("33" * 32, "P2", "OD", diagnosis=AMD, lesions=[
        ("drusen", [90, 270, 100, 280], 0.5), ("drusen", [120, 230, 128, 238], 0.6)])
    return [dr_od, dr_os, amd]


def _run(images, config=ChainConfig(), prompts_dir=None):
    records = [r for r, _, _ in images]
    anatomies = [a for _, a, _ in images]
    regions = [x for _, _, rs in images for x in rs]
    # A detector trusted for every lesion class (its silence is stated as absence).
    expansions = expand(OfflineExpander(ExpandConfig(), evidence=trusting(LESIONS)), records, anatomies, regions).expansions
    return chain(records, anatomies, regions, expansions, config, prompts_dir)


@pytest.fixture(scope="module")
def built(images):
    out, rejects = _run(images)
    assert rejects == []
    return out


def _of(records, sha, task):
    return [r for r in records if r.sha256 == sha and r.task == task]


def test_all_six_task_types_are_produced(built, images):
    dr_od_sha = images[0][0].sha256
    assert {r.task for r in built if r.sha256 == dr_od_sha} == FAMILIES
    counts = {task: len(_of(built, dr_od_sha, task)) for task in FAMILIES}
    # 6 classes present (disc, cup, fovea, microaneurysm, haemorrhage, hard exudate), capped at 4 each;
    # 3 lesion kinds present and 3 absent: 2 + 2 presence questions, 2 counts, 2 attributes.
    assert counts == {"disease_diagnosis": 1, "severity_grading": 1, "region_identification": 4,
                      "region_detection": 4, "report_generation": 1, "grounded_report": 1, "cognitive_chain": 1,
                      "multi_turn": 1, "finding_presence": 4, "counting": 2, "lesion_attribute": 2}
    # AMD has no grade, so no severity question; one lesion kind present, so 1 + 3 presence questions.
    amd_sha = images[2][0].sha256
    assert {r.task for r in built if r.sha256 == amd_sha} == FAMILIES - {"severity_grading"}
    assert len(_of(built, amd_sha, "finding_presence")) == 4 and len(_of(built, amd_sha, "counting")) == 1


def test_records_validate_against_the_instruction_record_model(built):
    for r in built:
        dumped = r.model_dump(mode="json", by_alias=True)
        turns = len(dumped["conversations"]) // 2
        assert [t["from"] for t in dumped["conversations"]] == ["human", "gpt"] * turns
        assert turns == (5 if r.task == "multi_turn" else 1)
        assert sum(t["value"].count("<image>") for t in dumped["conversations"]) == 1
        assert InstructionRecord.model_validate(dumped) == r
        assert InstructionRecord.model_validate_json(r.model_dump_json(by_alias=True)) == r
        assert r.conversations[0].value.startswith("<image>\n")
        assert r.conversations[1].value.strip() == r.conversations[1].value != ""
        assert r.provenance.backend == "offline" and r.language == "en"
    assert len({r.record_id for r in built}) == len(built)


def test_grading_questions_name_the_disease_the_grade_belongs_to(images):
    record, anat, regions = images[2]
    staged = (record.model_copy(update={"grade": "Intermediate AMD"}), anat, regions)
    out, _ = _run([images[0], staged], ChainConfig(languages=["en", "zh"]))
    questions = {(r.sha256[:2], r.language): r.conversations[0].value for r in out if r.task == "severity_grading"}
    assert "diabetic retinopathy" in questions[("11", "en")]
    assert "age-related macular degeneration" in questions[("33", "en")]
    assert "diabetic" not in questions[("33", "en")]
    assert "黄斑变性" in questions[("33", "zh")] and "糖尿病" in questions[("11", "zh")]
    assert [r.conversations[1].value for r in out if r.task == "severity_grading" and r.sha256[:2] == "33"
            and r.language == "en"] == ["Intermediate AMD"]


def test_answers_match_the_expansion(built, images):
    dr_od_sha = images[0][0].sha256
    assert _of(built, dr_od_sha, "disease_diagnosis")[0].conversations[1].value == DR
    assert _of(built, dr_od_sha, "severity_grading")[0].conversations[1].value == DR_GRADES[2]
    assert _of(built, images[1][0].sha256, "severity_grading")[0].conversations[1].value == DR_GRADES[1]
    assert _of(built, images[2][0].sha256, "disease_diagnosis")[0].conversations[1].value == AMD
    for r in built:
        assert r.diagnosis == {"11": DR, "22": DR, "33": AMD}[r.sha256[:2]]


def test_questions_come_from_the_templates(built):
    by_task = templates()
    assert set(by_task) == FAMILIES
    for r in built:
        if r.task == "multi_turn":
            steps = by_task[r.task].meta["tasks"][r.task]["steps"]
            asked = [t.value.removeprefix("<image>\n") for t in r.conversations[::2]]
            assert all(q in options for q, options in zip(asked, steps.values()))
            continue
        question = r.conversations[0].value.removeprefix("<image>\n")
        options = by_task[r.task].meta["tasks"][r.task]["questions"]
        if r.task == "severity_grading":
            options = options["dr"]  # every graded image here is graded for DR
        if r.task == "lesion_attribute":
            options = [q for kind in options.values() for q in kind]
            options = [q.format(target=BY_NAME[r.boxes[0].label].display.lower(),
                                box=f"<box>{box_text([r.boxes[0].box_999])}</box>") for q in options]
        elif r.task in ("region_detection", "finding_presence", "counting"):
            label = r.boxes[0].label if r.boxes else next(
                label for label in BY_NAME if BY_NAME[label].display.lower() in question.lower())
            target = BY_NAME[label].display.lower()
            assert target in question.lower() or plural(BY_NAME[label].display) in question.lower()
            if r.task == "region_detection":  # lesions in the plural, whatever their number
                options = options["lesion" if label in LESIONS else "anatomy"]
            options = [q.format(target=target, targets=plural(BY_NAME[label].display)) for q in options]
        assert question in options, (r.task, question)
        assert (r.template_id, r.template_version) == (by_task[r.task].id, by_task[r.task].version)


def test_box_text_and_grounded_syntax():
    assert box_text([[1, 2, 3, 4]]) == "[[1, 2, 3, 4]]"
    assert box_text([[1, 2, 3, 4], [10, 20, 30, 999]]) == "[[1, 2, 3, 4], [10, 20, 30, 999]]"
    _, _, regions = _image("44" * 32, "P", "OD")
    assert grounded("Optic disc", regions[:1]) == "<ref>Optic disc</ref><box>[[749, 500, 999, 749]]</box>"


def test_every_box_in_every_answer_follows_the_internvl_convention(built, images):
    by_image = {rec.sha256: rs for rec, _, rs in images}
    for r in built:
        answer = " ".join(t.value for t in r.conversations[1::2])
        tags = GROUNDED.findall(answer)
        # Nothing that looks like a box escapes the strict pattern.
        assert answer.count("<box>") == answer.count("</box>") == len(tags)
        assert answer.count("<ref>") == len(tags)
        for display, boxes in tags:
            parsed = json.loads(boxes)
            assert all(0 <= v <= 999 and isinstance(v, int) for b in parsed for v in b)
            assert all(b[0] <= b[2] and b[1] <= b[3] for b in parsed)
            same_kind = [x.box_999 for x in by_image[r.sha256] if x.display == display]
            assert parsed and all(b in same_kind for b in parsed), (r.task, display, parsed)
        for b in r.boxes:
            assert all(0 <= v <= 999 for v in b.box_999)


def test_region_detection_answers_give_every_box_of_the_class(built, images):
    record, _, regions = images[0]
    detections = _of(built, record.sha256, "region_detection")
    for r in detections:
        label = r.boxes[0].label
        expected = sorted((x for x in regions if x.label == label), key=lambda x: -x.confidence)
        assert [b.label for b in r.boxes] == [label] * len(expected)
        assert [b.box_999 for b in r.boxes] == [x.box_999 for x in expected]
        assert r.conversations[1].value == (f"<ref>{expected[0].display}</ref><box>"
                                            + box_text([x.box_999 for x in expected]) + "</box>")
        assert r.image_path == record.path
    micro = [r for r in detections if r.boxes[0].label == "microaneurysm"]
    if micro:  # the two microaneurysms, most confident first, in one <box>
        assert micro[0].conversations[1].value == (
            "<ref>Microaneurysm</ref><box>[[100, 824, 115, 839], [325, 425, 375, 475]]</box>")


def test_region_identification_uses_the_marked_image(built, images):
    record, _, regions = images[0]
    marked = {r.region_id: r for r in regions if r.marked_path}
    questions = _of(built, record.sha256, "region_identification")
    assert len(questions) == 4 and len({q.image_path for q in questions}) == 4
    for q in questions:
        region = next(r for r in marked.values() if r.marked_path == q.image_path)
        assert q.source_image_path == record.path
        assert q.conversations[1].value == region.display
        assert [(b.label, b.box_999) for b in q.boxes] == [(region.label, region.box_999)]


def test_reports_plain_and_grounded(built, images):
    record, _, regions = images[0]
    plain = _of(built, record.sha256, "report_generation")[0].conversations[1].value
    report = _of(built, record.sha256, "grounded_report")[0]
    text = report.conversations[1].value
    assert "<ref>" not in plain and "<box>" not in plain
    for part in (plain, text):
        assert part.startswith("Overview: A colour fundus photograph of the right eye (OD)")
        assert "Anatomy:" in part and "Lesions:" in part and "Findings:" in part
        assert f"\n\nConclusion: {DR} ({DR_GRADES[2]}), supported by 1 haemorrhage; 1 hard exudate; 2 " in part
    for region in regions:
        assert box_text([region.box_999])[1:-1] in text, region.label
    assert "<ref>Optic disc</ref><box>[[749, 500, 999, 749]]</box>" in text
    assert [(b.label, b.box_999) for b in report.boxes] == [(r.label, r.box_999) for r in regions]
    # The AMD report grounds its two drusen in one tag.
    amd_text = _of(built, images[2][0].sha256, "grounded_report")[0].conversations[1].value
    assert re.search(rf"- <ref>Drusen</ref><box>\[{BOX}, {BOX}\]</box> \(2\)", amd_text)


def test_no_lesions_and_no_region_questions(images):
    record, anat, regions = _image("55" * 32, "P9", "OS", grade=DR_GRADES[0], dr_grade=0)
    out, rejects = _run([(record, anat, regions)], ChainConfig(max_region_questions=0))
    assert rejects == []
    assert [r.task for r in out] == ["disease_diagnosis", "severity_grading", "finding_presence", "finding_presence",
                                     "finding_presence", "finding_presence", "report_generation", "grounded_report",
                                     "cognitive_chain", "multi_turn"]
    assert all(r.conversations[1].value.startswith("No, no ") for r in out if r.task == "finding_presence")
    report = out[6].conversations[1].value
    assert "- No lesion is seen." in report and "Normal fundus (No diabetic retinopathy)" in report


def test_question_choice_is_seeded_and_reproducible(images, built):
    again, _ = _run(images)
    assert [r.model_dump() for r in again] == [r.model_dump() for r in built]

    reseeded, _ = _run(images, ChainConfig(seed=1))
    fixed = ("disease_diagnosis", "severity_grading", "report_generation", "grounded_report")
    before = [r for r in built if r.task in fixed]
    after = [r for r in reseeded if r.task in fixed]
    # The same samples with the same answers; only the wording of the questions moves.
    assert [(r.record_id, r.conversations[1].value) for r in after] == [
        (r.record_id, r.conversations[1].value) for r in before]
    assert [r.conversations[0].value for r in after] != [r.conversations[0].value for r in before]
    # The seed also picks which regions are asked about (region_detection: 4 of 6 classes).
    picked = lambda records: [r.boxes[0].label for r in records if r.task == "region_detection"]  # noqa: E731
    assert picked(_run(images, ChainConfig(seed=1))[0]) == picked(reseeded)
    assert any(picked(_run(images, ChainConfig(seed=s))[0]) != picked(built) for s in range(1, 6))


def test_the_split_is_left_to_the_write_stage(built):
    assert built and all(r.split is None for r in built)  # decided across shards, never provisionally here


def test_a_broken_template_rejects_the_image_not_the_run(images, tmp_path):
    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts)
    grading = prompts / "chain" / "grading.j2"
    grading.write_text(grading.read_text().replace("{{ image.grade }}", "{{ image.no_such_field }}"))
    out, rejects = _run(images, prompts_dir=str(prompts))
    assert sorted(r.item for r in rejects) == sorted([images[0][0].path, images[1][0].path])  # the graded ones
    assert all(r.stage == "chain" and r.reason.startswith("chain template failed:") for r in rejects)
    assert {r.sha256 for r in out} == {images[2][0].sha256}


def test_chain_on_synthetic_images_grounds_the_true_boxes(tmp_path):
    root = tmp_path / "in"
    generate(root, 2, seed=0, size=256, full_labels=True)
    config = IngestConfig()
    labels, _ = load_labels(root, config)
    sources, _ = scan(root)
    records, _ = ingest(root, sources, labels, config)
    detections = [d for r in records for d in from_labels(r)]
    anatomies, regions, rejects = crop(records, detections, tmp_path / "crops", CropConfig())
    assert rejects == []
    expansions = expand(OfflineExpander(ExpandConfig()), records, anatomies, regions).expansions
    out, rejects = chain(records, anatomies, regions, expansions, ChainConfig())
    assert rejects == [] and TASKS <= {r.task for r in out}

    truth = json.loads((root / "labels.json").read_text())["images"]
    for record in records:
        entry = next(e for e in truth if e["image"] == record.relpath)
        expected = sorted(box_999(b["xyxy"], 256, 256) for b in entry["boxes"])
        report = _of(out, record.sha256, "grounded_report")[0]
        assert sorted(b.box_999 for b in report.boxes) == expected
        in_text = sorted(b for _, boxes in GROUNDED.findall(report.conversations[1].value) for b in json.loads(boxes))
        assert in_text == expected


def test_presence_counting_and_attribute_answers(built, images):
    record, _, regions = images[0]
    presence = {r.conversations[0].value: r.conversations[1].value for r in _of(built, record.sha256, "finding_presence")}
    yes = [a for a in presence.values() if a.startswith("Yes. <ref>")]
    no = [a for a in presence.values() if a.startswith("No, no ")]
    assert len(yes) == 2 and len(no) == 2  # present and absent, balanced
    assert all(any(k in a for k in ("cotton-wool spot", "drusen", "neovascularisation")) for a in no)
    for r in _of(built, record.sha256, "counting"):
        label = r.boxes[0].label
        n = sum(1 for x in regions if x.label == label)
        assert r.conversations[1].value.startswith(f"{n}: <ref>{BY_NAME[label].display}</ref>")
        assert len(r.boxes) == n
    for r in _of(built, record.sha256, "lesion_attribute"):
        region = next(x for x in regions if x.box_999 == r.boxes[0].box_999)
        answer = r.conversations[1].value
        assert any(fact in answer for fact in (f"{region.size_dd:.2f} disc diameters across",
                                               f"{region.fovea_distance_dd:.1f} disc diameters from the fovea",
                                               region.colour.capitalize()))
        assert f"<box>{box_text([region.box_999])}</box>" in r.conversations[0].value


def test_cognitive_chain_and_multi_turn_walk_the_same_steps(built, images):
    record, _, regions = images[0]
    chain_answer = _of(built, record.sha256, "cognitive_chain")[0].conversations[1].value
    steps = [line.split(",")[0] for line in chain_answer.split("\n\n")]
    assert steps == ["Step 1", "Step 2", "Step 3", "Step 4", "Step 5"]
    assert f"Step 5, diagnosis: {DR} ({DR_GRADES[2]})" in chain_answer
    assert "2 <ref>Microaneurysm</ref><box>" in chain_answer  # lesions cite their boxes with counts
    # Step 3 measures each lesion kind: size range, quadrants, how near the nearest comes to the
    # fovea and the disc margin. One microaneurysm in each of two quadrants: neither is "mostly".
    ma = sorted((r for r in regions if r.label == "microaneurysm"), key=lambda r: r.size_dd)
    assert {r.quadrant for r in ma} == {"inferotemporal", "superonasal"}
    assert (f"{ma[0].size_dd:.2f} to {ma[-1].size_dd:.2f} disc diameters across, in the inferotemporal and "
            "superonasal quadrants, the nearest 0.7 disc diameters from the fovea and 1.6 disc diameters from the disc margin"
            ) in chain_answer  # [130, 170, 150, 190]: its corner (130, 190) 67 px from the fovea, 209 px from the disc's centre
    talk = _of(built, record.sha256, "multi_turn")[0].conversations
    assert len(talk) == 10 and talk[0].value.startswith("<image>\n") and "<image>" not in talk[2].value
    assert talk[3].value.startswith("<ref>Optic disc</ref><box>") and talk[9].value.startswith(DR)
    assert talk[7].value.startswith("Present: 2 microaneurysms") and "Absent: cotton-wool spot" in talk[7].value


def test_chinese_records_beside_english(images):
    out, rejects = _run(images, ChainConfig(languages=["en", "zh"]))
    assert rejects == []
    zh = [r for r in out if r.language == "zh"]
    assert {r.task for r in zh} == {"disease_diagnosis", "severity_grading", "region_identification",
                                    "region_detection", "finding_presence", "counting"}
    dr_od = images[0][0].sha256
    assert _of(zh, dr_od, "disease_diagnosis")[0].conversations[1].value == "糖尿病视网膜病变"
    assert _of(zh, dr_od, "severity_grading")[0].conversations[1].value == "中度非增殖性糖尿病视网膜病变"
    assert all(GROUNDED.findall(r.conversations[1].value) for r in _of(zh, dr_od, "region_detection"))
    assert "<ref>视盘</ref>" in " ".join(r.conversations[1].value for r in _of(zh, dr_od, "region_detection"))
    english = [r for r in out if r.language == "en"]
    assert len({r.record_id for r in out}) == len(out)
    assert [r.record_id for r in english] == [r.record_id for r in _run(images)[0]]


def test_a_class_is_mostly_in_a_quadrant_only_with_over_half_of_its_boxes_there():
    """Fovea at (100, 250) of a right eye: above and right of it is superonasal. A box across the
    line through the fovea is in no quadrant, and still counts among the boxes."""
    def facts(*boxes):
        _, _, regions = _image("44" * 32, "P3", "OD", lesions=[("haemorrhage", list(b), 0.5) for b in boxes])
        return group_facts([r for r in regions if r.label == "haemorrhage"])

    superonasal, inferonasal, across = (130, 170, 150, 190), (130, 300, 150, 320), (90, 100, 110, 120)
    assert {k: facts(superonasal, superonasal)[k] for k in ("quadrant", "quadrant_share")} == {
        "quadrant": "superonasal", "quadrant_share": "all"}
    assert facts(superonasal, superonasal, across)["quadrant_share"] == "most"
    tie = facts(superonasal, inferonasal, across, superonasal, inferonasal)
    # neither holds over half; the quadrants are not listed, as the box across the line is in neither
    assert tie["quadrant"] is None and tie["quadrants"] == []
    assert facts(superonasal, inferonasal)["quadrants"] == ["superonasal", "inferonasal"]
    # how near the nearest comes: the inferonasal box's corner (130, 300), hypot(30, 50) px, not its centre's 0.81 DD
    assert tie["nearest_fovea_dd"] == 0.58


def test_a_grade_with_no_finding_to_reason_from_gets_no_reasoning_chain():
    """An EyePACS-like photograph: a DR grade, and a detector trusted on no lesion class, so no
    finding is stated either way. Its grade and diagnosis are records; a cognitive chain or a
    conversation or a report concluding "proliferative DR" from "no finding could be established" is not."""
    record, anat, regions = _image("55" * 32, "P5", "OD", diagnosis=DR, grade=DR_GRADES[4], dr_grade=4)
    expansions = expand(OfflineExpander(ExpandConfig(), evidence=trusting([])), [record], [anat], regions).expansions
    assert expansions[0].image.positive_findings == expansions[0].image.negative_findings == []
    out, rejects = chain([record], [anat], regions, expansions, ChainConfig())
    tasks = {r.task for r in out}
    assert {"disease_diagnosis", "severity_grading"} <= tasks and rejects == []
    assert not tasks & {"cognitive_chain", "multi_turn", "report_generation", "grounded_report"}
    # with one finding assessed (a trusted detector's silence on drusen), the chain has a step to reason from
    some = expand(OfflineExpander(ExpandConfig(), evidence=trusting(["drusen"])), [record], [anat], regions).expansions
    assert {"cognitive_chain", "multi_turn"} <= {r.task for r in chain([record], [anat], regions, some,
                                                                       ChainConfig())[0]}


def test_a_lesion_with_nothing_measured_costs_no_record():
    """No disc or fovea located (8 of the 69 real photographs) and a lesion too faint for its
    colour to be stated: it gets no attribute question, and the image keeps its other records
    (a choice among no kinds rejected the whole image before)."""
    record, anat, regions = _image("66" * 32, "P6", "OD", lesions=[("hard_exudate", [150, 300, 170, 312], 0.9)])
    blind = Anatomy(sha256=record.sha256, laterality="OD", laterality_source="label")
    regions = [r.model_copy(update={**region_facts(r.xyxy, blind), "colour": None}) for r in regions]
    expansions = expand(OfflineExpander(ExpandConfig(), evidence=trusting(LESIONS)), [record], [blind],
                        regions).expansions
    out, rejects = chain([record], [blind], regions, expansions, ChainConfig())
    assert rejects == [] and "lesion_attribute" not in {r.task for r in out}
    assert {"finding_presence", "grounded_report", "cognitive_chain"} <= {r.task for r in out}


def test_no_line_of_any_answer_ends_in_a_space(built):
    """Templates joining optional parts leave no stray space before a line break (the report's
    findings line ended "...fovea. " where nothing was absent)."""
    record, anat, regions = _image("77" * 32, "P7", "OD", lesions=[("hard_exudate", [150, 300, 170, 312], 0.9)])
    nothing_absent = expand(OfflineExpander(ExpandConfig(), evidence=trusting([])), [record], [anat], regions).expansions
    assert nothing_absent[0].image.positive_findings and not nothing_absent[0].image.negative_findings
    more, _ = chain([record], [anat], regions, nothing_absent, ChainConfig())
    assert {"report_generation", "cognitive_chain"} <= {r.task for r in more}
    # asked which findings can be ruled out, the conversation says that none can
    (talk,) = [r for r in more if r.task == "multi_turn"]
    assert talk.conversations[7].value.endswith(". Nothing can be ruled out from the evidence available.")
    for record in [*built, *more]:
        for turn in record.conversations:
            assert all(line == line.rstrip() for line in turn.value.split("\n")), (record.task, turn.value)

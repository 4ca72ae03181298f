"""Concept prompts: the concept head, its features, training, persistence and instance finding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskmill.engine.training.concepts import (
    ConceptExamples,
    ConceptTrainingConfig,
    concept_examples,
    concept_vocabulary,
    train_concept_head,
)
from maskmill.engine.training.synthetic import KINDS, scene
from maskmill.model import (
    CheckpointError,
    Predictor,
    build_model,
    load_checkpoint,
    load_default,
    save_checkpoint,
)
from maskmill.model.concept_head import (
    ConceptHead,
    UnknownConceptError,
    concept_key,
    mask_pooled_features,
)
from maskmill.model.concepts import find_instances, require_concept_head
from maskmill.storage.images import load_image


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _learn_kinds(model, made) -> tuple[list[dict], ConceptExamples]:
    """Give ``model`` a concept head learned from one scene's kinds; its masks as RLEs and the
    examples the head learned from."""
    masks = [_rle(m) for m in made.instances]
    sample = {"masks": masks, "categories": made.kinds, "category_ids": [None] * len(masks)}
    examples = concept_examples(model, [sample], [made.image], ConceptTrainingConfig())
    model.concept_head, _ = train_concept_head(examples)
    return masks, examples


@pytest.fixture(scope="module")
def shipped():
    """The shipped model, without a concept head (tests leave it as it is)."""
    return load_default()


@pytest.fixture(scope="module")
def learned():
    """The shipped model with a concept head learned from one scene (each object painted in
    its kind's colour), the scene, its masks as RLEs and the head's examples: learned once for
    the tests that prompt it (they leave the model as it is)."""
    model = load_default()
    made = scene(256, 256, seed=21, kind_colours=True)
    masks, examples = _learn_kinds(model, made)
    return model, made, masks, examples


# ------------------------------------------------------------------------------- the head


def test_concept_names_compare_loosely_and_unknown_ones_are_named():
    head = ConceptHead(8, ["Hazel  nut", "date"], category_ids=[3, 1])
    assert head.index("hazel nut") == 0 and head.index(" DATE ") == 1
    assert concept_key("Hazel  Nut") == "hazel nut"
    with pytest.raises(UnknownConceptError, match=r"unknown concept 'fig'.*'Hazel  nut', 'date'"):
        head.index("fig")
    assert issubclass(UnknownConceptError, KeyError) and issubclass(UnknownConceptError, ValueError)
    with pytest.raises(ValueError, match="distinct"):
        ConceptHead(8, ["fig", "FIG"])
    with pytest.raises(ValueError, match="at least one"):
        ConceptHead(8, [])


def test_head_scores_shape_and_range():
    head = ConceptHead(16, ["a", "b", "c"]).eval()
    with torch.no_grad():
        scores = head.scores(torch.randn(5, 16))
    assert scores.shape == (5, 3)
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        head(torch.randn(5, 15))


def test_mask_pooled_features_average_inside_and_around():
    # A 2-channel 8 x 8 embedding of a 64 x 64 input (8 px cells); the image is 64 x 64.
    features = torch.zeros(1, 2, 8, 8)
    features[0, 0, :, :4] = 1.0  # channel 0: 1 on the left half
    features[0, 1] = torch.arange(8.0)[None, :].expand(8, 8)  # channel 1: the column index
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 16:48, 0:16] = True  # columns 0-1 of the embedding, rows 2-5
    pooled = mask_pooled_features(features, mask, (64, 64), 64)
    assert pooled.shape == (1, 4)
    inside, ring = pooled[0, :2], pooled[0, 2:]
    assert inside.tolist() == pytest.approx([1.0, 0.5])
    # The ring (2 cells around the mask) covers columns 0-3: all on the left half, and the
    # column mean weighted by ring cells lies right of the mask.
    assert ring[0] == pytest.approx(1.0)
    assert ring[1] > inside[1]
    assert mask_pooled_features(features, mask[:0], (64, 64), 64).shape == (0, 4)


def test_mask_pooled_features_follow_the_resize_and_padding():
    """A 32 x 64 image fills the top half of the square input: a mask of its bottom row of
    pixels pools embedding rows inside the image, never the padding below."""
    features = torch.zeros(1, 1, 8, 8)
    features[0, 0, :4] = 1.0  # the image's rows; rows 4-7 are padding
    mask = torch.zeros(1, 32, 64, dtype=torch.bool)
    mask[0, 28:, :] = True
    pooled = mask_pooled_features(features, mask, (32, 64), 64)
    assert pooled[0, 0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- training


def test_vocabulary_merges_spellings_and_keeps_the_smallest_id():
    samples = [
        {"categories": ["Fig", None, "date"], "category_ids": [7, None, 2]},
        {"categories": ["fig", "hazelnut"], "category_ids": [5, None]},
    ]
    names, ids = concept_vocabulary(samples)
    assert names == ["date", "Fig", "hazelnut"]
    assert ids == [2, 5, None]


def test_training_drives_the_loss_down_and_separates_concepts():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 32, generator=generator) * 3
    labels = torch.arange(-1, 3).repeat_interleave(50)  # -1: no concept
    features = torch.randn(len(labels), 32, generator=generator)
    features[labels >= 0] += centres[labels[labels >= 0]]
    examples = ConceptExamples(features, labels, ["a", "b", "c"], [1, 2, 3], images=1)
    head, figures = train_concept_head(examples, ConceptTrainingConfig(steps=200))
    assert figures["concept_loss_last"] < 0.3 * figures["concept_loss_first"]
    assert figures["concept_positives"] == 150 and figures["concept_examples"] == 200
    with torch.no_grad():
        scores = head.scores(features)
    predicted = scores.argmax(1)
    positives = labels >= 0
    assert (predicted[positives] == labels[positives]).float().mean() > 0.95
    assert scores[~positives].max(1).values.mean() < 0.5 < scores[positives].max(1).values.mean()


def test_no_categories_is_an_error():
    empty = ConceptExamples(torch.zeros(3, 4), torch.full((3,), -1), ["a"], [None], images=1)
    with pytest.raises(ValueError, match="no categorised masks"):
        train_concept_head(empty)


def test_concept_examples_label_candidates_by_overlap(learned):
    model, made, masks, examples = learned  # concept_examples of the scene's masks and kinds
    names = sorted(set(made.kinds))
    assert examples.names == names and examples.images == 1
    assert examples.features.shape == (len(examples.labels), 2 * model.prompt_encoder.embed_dim)
    # Every stored mask is a positive of its own kind, and candidates add more rows: negatives
    # (overlapping nothing) and positives (overlapping an object at IoU >= 0.5).
    counts = torch.bincount(examples.labels + 1, minlength=len(names) + 1)
    for kind in names:
        assert counts[names.index(kind) + 1] >= made.kinds.count(kind)
    assert counts[0] > 0
    assert len(examples.labels) > len(masks)


# -------------------------------------------------------------------------- persistence


def test_checkpoint_keeps_the_head_apart_from_the_official_state_dict(tmp_path):
    model = build_model("tiny", seed=0)
    official_keys = set(model.state_dict())
    model.concept_head = ConceptHead(256, ["fig", "date"], category_ids=[2, 1], threshold=0.4)
    with torch.no_grad():
        model.concept_head.concepts.normal_()
    path = str(tmp_path / "model.pt")
    save_checkpoint(model, path)
    payload = torch.load(path, weights_only=True)
    assert set(payload["state_dict"]) == official_keys  # segment-anything loads it as it is
    loaded = load_checkpoint(path)
    head = loaded.concept_head
    assert head.names == ["fig", "date"] and head.category_ids == [2, 1]
    assert head.threshold == pytest.approx(0.4)
    features = torch.randn(4, 256)
    assert torch.equal(head.scores(features), model.concept_head.eval().scores(features))
    # A head whose tensors do not fit its config is refused, naming the file.
    payload["concept_head"]["state_dict"]["concepts"] = torch.zeros(5, 64)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="concept head does not match"):
        load_checkpoint(path)


def test_a_model_without_a_head_says_how_to_get_one(shipped):
    model = shipped
    predictor = Predictor(model)
    predictor.set_image(scene(64, 64, seed=1).image)
    with pytest.raises(ValueError, match="no concept head.*categories"):
        predictor.predict_concept("fig")
    with pytest.raises(ValueError, match="no concept head"):
        require_concept_head(model)


def test_find_instances_reports_each_mask_once_with_its_concept(learned):
    model, made, masks, _ = learned
    predictor = Predictor(model)
    predictor.set_image(made.image)
    everything = find_instances(model, predictor.image_embedding, threshold=0.0)
    assert everything and all(r["category"] in made.kinds for r in everything)
    scores = [r["score"] for r in everything]
    assert scores == sorted(scores, reverse=True)
    kind = made.kinds[0]
    only = predictor.predict_concept(kind.upper(), threshold=0.0)
    assert only and {r["category"] for r in only} == {kind}
    # On the image it learned from, the best instance of a kind is one of its objects.
    truth = [m for m, k in zip(masks, made.kinds, strict=True) if k == kind]
    best = only[0]["segmentation"]
    assert np.asarray(mask_utils.iou([best], truth, [0] * len(truth))).max() >= 0.5
    with pytest.raises(UnknownConceptError):
        predictor.predict_concept("unicorn")
    assert set(KINDS) >= set(made.kinds)


# --------------------------------------------------------------------------- end to end


def test_import_retrain_then_segment_text_finds_a_kind_on_a_held_back_scene(
    ray_cluster, tmp_path, capsys
):
    """Generated scenes whose objects are categorised by kind: import them, retrain (the
    concept head learns the kinds), then `maskmill segment --text` on a scene kept back.

    Five scenes (seeds 7005-7009) hold every kind, mugs on three of them; concept examples
    cost a grid of candidates per scene, so no more scenes than that."""
    import json

    from maskmill.engine.plan import ensure_initial_model, make_plan
    from maskmill.engine.training.retrain import RetrainConfig, retrain
    from maskmill.engine.training.synthetic import write_coco
    from maskmill.flows.cli import main
    from maskmill.storage import Store, import_coco

    train = write_coco(tmp_path / "train", 5, seed=7005, height=256, width=256, kinds=True)
    store = Store(str(tmp_path / "store"))
    import_coco(str(train), str(tmp_path / "train" / "images"), store)
    plan = make_plan(store, manual_rounds=0, semi_rounds=0, auto=False, holdout=0.0)
    base = ensure_initial_model(store, plan)
    config = RetrainConfig(steps=2, workers=1, masks_per_image=1, encoder_blocks=0)
    meta = retrain(store, 1, plan, base, config)
    assert meta["concepts"] == sorted([*KINDS, "part"])
    assert not meta["promoted"]  # no validation images: `segment --store` falls back to it
    assert meta["metrics"]["concept_images"] == 5
    assert meta["metrics"]["concept_loss_last"] < meta["metrics"]["concept_loss_first"]

    held = write_coco(tmp_path / "held", 1, seed=7105, height=256, width=256, kinds=True)
    dataset = json.loads(held.read_text())
    kind_ids = {c["name"]: c["id"] for c in dataset["categories"]}
    out = tmp_path / "found.png"
    code = main(
        [
            "segment",
            "--store",
            store.url,
            "--image",
            str(tmp_path / "held/images/000000.png"),
            "--text",
            "mug",
            "--threshold",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.is_file()
    lines = capsys.readouterr().out.splitlines()
    found = [line for line in lines if line.startswith("mug: score")]
    assert found and lines[-1].startswith(f"{len(found)} instances")
    truth = [
        a["segmentation"] for a in dataset["annotations"] if a["category_id"] == kind_ids["mug"]
    ]
    assert truth  # the held-back scene has mugs
    predictor = Predictor(load_checkpoint(meta["uri"]))
    predictor.set_image(load_image(str(tmp_path / "held/images/000000.png")))
    mugs = predictor.predict_concept("mug", threshold=0.0)
    assert len(mugs) == len(found)
    ious = np.asarray(mask_utils.iou([m["segmentation"] for m in mugs], truth, [0] * len(truth)))
    # A mug of the scene is found, and among the first reports (scores rank them).
    assert ious.max() >= 0.5, ious.max(0)
    assert int(np.flatnonzero(ious.max(1) >= 0.5)[0]) < 3
    # `maskmill eval --concepts` on the held-back scene: COCOeval of every kind's instances.
    code = main(
        [
            "eval",
            "--store",
            store.url,
            "--concepts",
            "--json",
            "--annotations",
            str(held),
            "--images",
            str(tmp_path / "held/images"),
            "--points-per-side",
            "8",
        ]
    )
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["concept_categories"] == sorted([*KINDS, "part"])
    assert metrics["concept_unknown"] == [] and metrics["images"] == 1
    per_category = metrics["concept_ap_per_category"]
    present = {c["name"] for c in dataset["categories"]} & {
        c["name"]
        for c in dataset["categories"]
        if any(a["category_id"] == c["id"] for a in dataset["annotations"])
    }
    assert set(per_category) == present  # a line per category with ground truth
    assert all(0.0 <= v["ap50"] <= 1.0 for v in per_category.values())
    assert per_category["mug"]["ap50"] > 0.0 and 0.0 < metrics["concept_ap50"] <= 1.0
    # An unknown concept is one line, exit 2.
    assert main(["segment", "--store", store.url, "--text", "unicorn"]) == 2
    assert "unknown concept 'unicorn'" in capsys.readouterr().err


def test_prefill_is_encoded_once_and_arrives_labelled(shipped, learned):
    from maskmill.engine.stages import encode_and_prefill, stage_generator

    model, made, _, _ = learned
    # The semi stage's generator on a grid of 8 (a stage option): what is checked is how the
    # pre-fill is made and labelled, on any grid.
    generator = stage_generator(shipped, "semi", {"points_per_side": 8})
    unlabelled = encode_and_prefill(Predictor(shipped), generator, made.image)
    # Same masks as the generator encoding the image itself; no head, no categories.
    assert [r["segmentation"] for r in unlabelled] == [
        r["segmentation"] for r in generator.generate(made.image)
    ]
    assert unlabelled and all(r["source"] == "model" and "category" not in r for r in unlabelled)
    # The same weights with the head learned from the scene: the same masks, now labelled.
    generator = stage_generator(model, "semi", {"points_per_side": 8})
    labelled = encode_and_prefill(Predictor(model), generator, made.image)
    assert [r["segmentation"] for r in labelled] == [r["segmentation"] for r in unlabelled]
    named = [r for r in labelled if r.get("category") is not None]
    assert named and all(r["score"] >= model.concept_head.threshold for r in named)
    assert {r["category"] for r in named} <= set(made.kinds)


def test_prefill_by_concept_is_every_instance_of_it_labelled(shipped, learned, tmp_path):
    from maskmill.engine.stages import check_prefill_concepts, encode_and_prefill, stage_generator
    from maskmill.engine.web.session import AnnotationSession

    with pytest.raises(ValueError, match="no concept head"):
        check_prefill_concepts(shipped, ["mug"])
    check_prefill_concepts(shipped, [])  # no concepts: the generator's pre-fill, nothing to check
    model, made, _, _ = learned  # the same weights with a head learned from the scene's kinds
    generator = stage_generator(model, "semi")
    predictor = Predictor(model)
    kind = made.kinds[0]
    prefill = encode_and_prefill(predictor, generator, made.image, concepts=[kind])
    expected = find_instances(model, predictor.image_embedding, [kind])
    assert [r["segmentation"] for r in prefill] == [r["segmentation"] for r in expected]
    assert prefill and all(r["category"] == kind and r["source"] == "model" for r in prefill)
    assert all(r["score"] >= model.concept_head.threshold for r in prefill)
    # The kind's instances are what is pre-filled: each found mask overlaps one of them.
    truth = [_rle(m) for m, k in zip(made.instances, made.kinds, strict=True) if k == kind]
    ious = np.asarray(mask_utils.iou([r["segmentation"] for r in prefill], truth, [0] * len(truth)))
    assert ious.max() >= 0.5
    with pytest.raises(UnknownConceptError, match="unicorn"):
        check_prefill_concepts(model, [kind, "unicorn"])
    with pytest.raises(ValueError, match="semi stage"):
        AnnotationSession(str(tmp_path / "store"), 1, "manual", model, prefill_concepts=[kind])

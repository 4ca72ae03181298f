"""The embedding cache (``storage.embeddings``, ``engine.embeddings``): stages give the same masks
with the cache cold, warm and off; a frozen-encoder model hits it, a changed encoder misses; a
corrupt entry is a miss and is rewritten; Ray actors read it; ``maskmill stats`` reports its size.

Stores are built here from generated scenes (COCO ground truth imported as round 0); the model is
a ``tiny`` one with fixed random weights (what is tested is sameness, not quality).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from maskmill.engine.annotators import SimulatedAnnotator
from maskmill.engine.embeddings import (
    generate_masks,
    image_embedding,
    image_embeddings,
    open_embedding_cache,
)
from maskmill.engine.evaluate import evaluate_coco
from maskmill.engine.plan import (
    Plan,
    heldout_samples,
    heldout_truth,
    interactive_scores,
    make_plan,
    model_bytes,
)
from maskmill.engine.stages import fully_automatic, semi_automatic, stage_generator
from maskmill.engine.training.synthetic import photo_like, write_coco
from maskmill.engine.web.session import AnnotationSession, WebAnnotator
from maskmill.flows.cli import build_parser
from maskmill.flows.cli_engine import settings_values
from maskmill.model import MaskGenerator, Predictor, build_model
from maskmill.model.sam import encoder_digest
from maskmill.storage import Catalog, Store, compute_stats, format_stats, import_coco, rle
from maskmill.storage.embeddings import (
    CachedEmbedding,
    EmbeddingCache,
    cache_size,
    decode_entry,
    view_key,
)
from maskmill.storage.images import load_stored_image, read_image_info
from maskmill.storage.queries import ground_truth

# The semi stage's pre-fill: a small grid with every mask kept (a random model's scores are
# low), and one crop layer, so crops are cached as views of their own.
SEMI_OPTIONS = {
    "points_per_side": 2,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "crop_n_layers": 1,
}
AUTO_OPTIONS = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("cache-scenes")
    annotations = write_coco(folder, 2, seed=21, height=96, width=128, parts=False)
    return str(folder / "images"), str(annotations)


def make_store(path: Path, scenes: tuple[str, str], model) -> tuple[Store, Plan, dict]:
    """A store with the scenes as ground truth and ``model`` as v1; its plan and v1's meta."""
    images, annotations = scenes
    import_coco(annotations, images, str(path))
    store = Store(str(path))
    store.write_model(1, model_bytes(model, {}), {"round": 0, "config": model.config.to_dict()})
    plan = make_plan(store, manual_rounds=1, semi_rounds=0, auto=False, holdout=0.0)
    return store, plan, store.model_metas()[-1]


def entry_files(store: Store) -> dict[str, tuple[int, int]]:
    """Every cache entry file: path -> (inode, mtime ns); a rewrite (temp + rename) changes
    the inode."""
    root = Path(store.path("embeddings"))
    return {
        str(p): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*.npz"))
        if not p.name.startswith(".")
    }


def stage_masks(store: Store, round_: int, stage: str) -> dict[str, list[dict]]:
    """A round and stage's masks per image, in their stored order."""
    with Catalog(store) as catalog:
        columns, rows = catalog.query(
            "SELECT image_id, segmentation, height, width, source, clicks, mask_id "
            "FROM masks WHERE round = ? AND stage = ? ORDER BY image_id, mask_id",
            [round_, stage],
        )
    out: dict[str, list[dict]] = {}
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        out.setdefault(record["image_id"], []).append(record)
    return out


def as_rle(row: dict) -> dict:
    return {"size": [row["height"], row["width"]], "counts": row["segmentation"]}


def simulated(store: Store) -> SimulatedAnnotator:
    """The ground truth's annotator, one click per object (strokes finish it): a
    random model's clicks gain little, and each costs a decoder call."""
    truth = ground_truth(store)
    return SimulatedAnnotator(lambda image_id: truth.get(image_id, []), max_clicks=1)


def assert_same_masks(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> None:
    """Same images, same masks (RLE strings), same clicks, in the same order."""
    assert sorted(a) == sorted(b)
    for image_id in a:
        left = [(m["segmentation"], m["source"], m["clicks"]) for m in a[image_id]]
        right = [(m["segmentation"], m["source"], m["clicks"]) for m in b[image_id]]
        assert left == right, image_id


def assert_close_masks(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> None:
    """Same images and mask counts; each mask IoU >= 0.99 with its counterpart."""
    assert sorted(a) == sorted(b)
    for image_id in a:
        assert len(a[image_id]) == len(b[image_id]), image_id
        for left, right in zip(a[image_id], b[image_id], strict=True):
            iou = rle.ious([as_rle(left)], [as_rle(right)])[0, 0]
            assert iou >= 0.99, (image_id, iou)


# ------------------------------------------------------------------------------------ stages


def test_semi_stage_masks_cold_warm_and_off(tmp_path, scenes, model):
    """The semi stage (pre-fill with a crop layer, then the simulated annotator's clicks) gives
    exactly the same masks with the cache cold and warm, and the same masks up to float16
    rounding with it off; the warm and the off run write no entry. Three copies of one store
    (an annotator skips objects that earlier rounds of its store have masks of)."""
    cold_store, plan, meta = make_store(tmp_path / "cold", scenes, model)
    shutil.copytree(tmp_path / "cold", tmp_path / "warm")
    shutil.copytree(tmp_path / "cold", tmp_path / "off")
    ids = sorted(plan.images)[:1]
    annotator = simulated(cold_store)

    first = semi_automatic(cold_store, 1, plan, ids, meta, annotator, SEMI_OPTIONS)
    files = entry_files(cold_store)
    crops = len(MaskGenerator(model, **SEMI_OPTIONS).crop_boxes((96, 128)))
    assert crops == 5  # the whole image and a 2 x 2 layer
    assert len(files) == len(ids) * crops

    shutil.copytree(tmp_path / "cold" / "embeddings", tmp_path / "warm" / "embeddings")
    warm_store = Store(str(tmp_path / "warm"))
    warm_files = entry_files(warm_store)
    warm_meta = warm_store.model_metas()[-1]
    second = semi_automatic(warm_store, 1, plan, ids, warm_meta, annotator, SEMI_OPTIONS)
    assert entry_files(warm_store) == warm_files  # every embedding was read, none written

    off_store = Store(str(tmp_path / "off"))
    off_meta = off_store.model_metas()[-1]
    semi_automatic(
        off_store, 1, plan, ids, off_meta, annotator, SEMI_OPTIONS, embedding_cache=False
    )
    assert entry_files(off_store) == {}

    cold, warm, off = (stage_masks(s, 1, "semi") for s in (cold_store, warm_store, off_store))
    assert sum(map(len, cold.values())) >= 2
    # The pre-fill ran (a random model's masks: the annotator deletes them) and saw the same.
    prefill = [json.loads(row["metrics"])["prefill"] for row in (first, second)]
    assert prefill[0] > 0 and prefill[0] == prefill[1]
    assert_same_masks(cold, warm)
    assert_close_masks(cold, off)


def test_a_frozen_encoder_model_hits_and_a_trained_one_misses(tmp_path, model):
    """A model whose decoder changed (a frozen-encoder retrain) has the same digest and reads
    the entry; one whose encoder changed has its own digest and writes its own entry."""
    image = photo_like(64, 80, seed=7)
    store = Store(str(tmp_path / "store"))
    first = image_embedding(Predictor(model), "00aa", image, open_embedding_cache(store, model))
    files = entry_files(store)
    assert len(files) == 1

    frozen = copy.deepcopy(model)
    with torch.no_grad():
        frozen.mask_decoder.iou_prediction_head.layers[0].weight.mul_(1.5)
        frozen.prompt_encoder.point_embeddings[0].weight.add_(0.1)
    assert encoder_digest(frozen) == encoder_digest(model)
    hit = image_embedding(Predictor(frozen), "00aa", image, open_embedding_cache(store, frozen))
    assert entry_files(store) == files  # read, not written again
    assert torch.equal(hit.features, first.features)

    trained = copy.deepcopy(model)
    with torch.no_grad():
        trained.image_encoder.blocks[0].mlp.lin1.weight[0, 0] += 1e-3
    assert encoder_digest(trained) != encoder_digest(model)
    cache = open_embedding_cache(store, trained)
    assert cache.get("00aa", view_key(None, 512)) is None
    miss = image_embedding(Predictor(trained), "00aa", image, cache)
    after = entry_files(store)
    assert {p: after[p] for p in files} == files and len(after) == 2
    assert cache_size(store).encoders == 2
    assert not torch.equal(miss.features, first.features)


def test_automatic_stage_on_a_ray_actor_reads_the_cache(tmp_path, scenes, model, ray_cluster):
    """Entries written here are read by the Ray GeneratorActor (none rewritten), and its masks
    are exactly those made here from the same embeddings."""
    store, plan, meta = make_store(tmp_path / "store", scenes, model)
    ids = sorted(plan.images)
    generator = stage_generator(model, "auto", AUTO_OPTIONS)
    cache = open_embedding_cache(store, model)
    local = {i: generate_masks(generator, i, load_stored_image(plan.images[i]), cache) for i in ids}
    files = entry_files(store)
    assert len(files) == len(ids)

    row = fully_automatic(store, 1, plan, ids, meta, 1, AUTO_OPTIONS)
    assert row["images"] == len(ids)
    assert entry_files(store) == files  # the actor read every embedding
    # Rerun, every image done: the stored row comes back, and the rounds table is unchanged.
    rounds = store.read_table("rounds").to_pylist()
    assert fully_automatic(store, 1, plan, ids, meta, 1, AUTO_OPTIONS) == row
    assert [r for r in rounds if r["round"] == 1] == [row]  # round 0: the import's
    assert store.read_table("rounds").to_pylist() == rounds
    stored = stage_masks(store, 1, "auto")
    for image_id in ids:
        expected = [r["segmentation"]["counts"] for r in local[image_id]]
        assert sorted(m["segmentation"] for m in stored.get(image_id, [])) == sorted(expected)


def test_bf16_stages_and_actors_keep_their_own_cache_views(tmp_path, scenes, model, ray_cluster):
    """``encoder_precision="bf16"`` reaches the semi stage's predictor and generator, the Ray
    GeneratorActor and the annotation page: every entry they write is a ``-bf16`` view, the
    actor reads the ones written here (same masks, nothing rewritten), and a float32 run of
    the same images misses them all (so it never uses bf16 numbers)."""
    store, plan, meta = make_store(tmp_path / "store", scenes, model)
    ids = sorted(plan.images)
    annotator = simulated(store)
    semi_automatic(store, 1, plan, ids[:1], meta, annotator, SEMI_OPTIONS, encoder_precision="bf16")
    semi_files = entry_files(store)
    assert len(semi_files) == 5  # the whole image and 4 crops
    assert all(path.endswith("-512-bf16.npz") for path in semi_files)

    generator = stage_generator(model, "auto", AUTO_OPTIONS, "bf16")
    cache = open_embedding_cache(store, model)
    local = {i: generate_masks(generator, i, load_stored_image(plan.images[i]), cache) for i in ids}
    files = entry_files(store)
    assert len(files) == 6 and all(path.endswith("-bf16.npz") for path in files)
    row = fully_automatic(store, 2, plan, ids, meta, 1, AUTO_OPTIONS, encoder_precision="bf16")
    assert row["images"] == len(ids)
    # The stage says where its actors' models were: a GPU each where Ray has GPUs.
    on_gpus = ray.cluster_resources().get("GPU", 0) >= 1
    assert json.loads(row["metrics"])["actor_devices"] == ["cuda" if on_gpus else "cpu"]
    assert entry_files(store) == files  # the bf16 actor read every bf16 embedding
    stored = stage_masks(store, 2, "auto")
    for image_id in ids:
        expected = sorted(r["segmentation"]["counts"] for r in local[image_id])
        assert sorted(m["segmentation"] for m in stored.get(image_id, [])) == expected

    with AnnotationSession(
        store, 3, "manual", model, 1, WebAnnotator("a"), encoder_precision="bf16"
    ) as session:
        opened = session.state()["image"]["image_id"]
    assert entry_files(store) == files  # its image's bf16 view was there already
    assert cache.get(opened, view_key(None, 512, "bf16")) is not None
    # A float32 stage misses every bf16 entry and writes its own views beside them.
    fp32 = {
        i: generate_masks(
            stage_generator(model, "auto", AUTO_OPTIONS),
            i,
            load_stored_image(plan.images[i]),
            cache,
        )
        for i in ids
    }
    after = entry_files(store)
    assert {p: after[p] for p in files} == files and len(after) == len(files) + len(ids)
    assert sorted(p for p in after if p not in files) == sorted(
        cache.path(i, "full-512") for i in ids
    )
    assert all(len(fp32[i]) > 0 for i in ids)


def test_annotation_page_session_reads_and_writes_the_cache(tmp_path, scenes, model):
    store, plan, _ = make_store(tmp_path / "store", scenes, model)
    with AnnotationSession(store, 1, "manual", model, 1, WebAnnotator("a")) as session:
        opened = session.state()["image"]["image_id"]
    files = entry_files(store)
    assert len(files) == 1 and f"/{opened}/full-512.npz" in next(iter(files))
    # Off: the session encodes and writes nothing.
    with AnnotationSession(
        store, 2, "manual", model, 1, WebAnnotator("b"), embedding_cache=False
    ) as session:
        session.state()
    assert entry_files(store) == files


# --------------------------------------------------------------------------- entries, digests


def test_corrupt_or_truncated_entries_are_misses_and_are_rewritten(tmp_path, model):
    image = photo_like(90, 120, seed=5)
    store = Store(str(tmp_path / "store"))
    cache = open_embedding_cache(store, model)
    predictor = Predictor(model)
    first = image_embedding(predictor, "0123abcd", image, cache)
    path = cache.path("0123abcd", view_key(None, model.image_size))
    good = Path(path).read_bytes()
    entry = decode_entry(good)
    assert entry is not None and entry.features.dtype == np.float16
    assert entry.features.shape == (1, 128, 32, 32)
    assert (entry.original_size, entry.input_size) == ((90, 120), (384, 512))
    # The embedding used on the miss is the float16 one, exactly as read back.
    assert torch.equal(first.features, torch.from_numpy(entry.features).float())

    middle = bytearray(good)
    middle[len(good) // 2] ^= 0xFF  # a flipped byte inside the features
    for bad in (good[: len(good) // 2], bytes(middle), b"", b"not an npz at all"):
        Path(path).write_bytes(bad)
        assert cache.get("0123abcd", view_key(None, model.image_size)) is None
        again = image_embedding(predictor, "0123abcd", image, cache)
        assert torch.equal(again.features, first.features)
        assert Path(path).read_bytes() == good  # rewritten whole

    # An entry of another shape (a stale or foreign file) is a miss too.
    cache.put(
        "0123abcd",
        view_key(None, model.image_size),
        CachedEmbedding(np.zeros((1, 128, 16, 16), np.float16), (90, 120), (384, 512)),
    )
    again = image_embedding(predictor, "0123abcd", image, cache)
    assert torch.equal(again.features, first.features)
    assert Path(path).read_bytes() == good


def test_crop_views_match_the_generator_without_cache(tmp_path, model):
    """``generate_masks`` with a cold and a warm cache gives the same records; without a cache
    it gives exactly ``MaskGenerator.generate``'s (the model's own float32 features)."""
    image = photo_like(80, 100, seed=6)
    generator = MaskGenerator(model, crop_n_layers=1, **AUTO_OPTIONS)
    cache = open_embedding_cache(Store(str(tmp_path / "store")), model)
    cold = generate_masks(generator, "feed0001", image, cache)
    warm = generate_masks(generator, "feed0001", image, cache)
    assert cold == warm and len(cold) > 0
    assert generate_masks(generator, "feed0001", image, None) == generator.generate(image)
    views = sorted(p.name for p in Path(cache.path("feed0001", "x")).parent.iterdir())
    assert len(views) == 5 and "full-512.npz" in views
    assert "0-0-60-47-512.npz" in views or any(v.startswith("0-0-") for v in views)
    with pytest.raises(ValueError, match=r"crop box \[0, 0, 101, 80\]"):
        image_embeddings(generator.predictor, "feed0001", image, [[0, 0, 101, 80]], cache)


def test_view_keys_and_bad_keys():
    assert view_key(None, 1024) == "full-1024"
    assert view_key([0, 10, 300, 200], 1024) == "0-10-300-200-1024"
    assert view_key(None, 1024, "fp32") == "full-1024"
    assert view_key(None, 1024, "bf16") == "full-1024-bf16"
    assert view_key([0, 10, 300, 200], 1024, "fp16") == "0-10-300-200-1024-fp16"
    with pytest.raises(ValueError, match="precision must be a lowercase name"):
        view_key(None, 1024, "../x")
    with pytest.raises(ValueError, match="XYXY with x0 < x1"):
        view_key([5, 0, 5, 10], 1024)
    with pytest.raises(ValueError, match="4 non-negative integer"):
        view_key([0, 0, 1.5, 3], 1024)
    store = Store("memory://cache-keys")
    with pytest.raises(ValueError, match="encoder digest"):
        EmbeddingCache(store, "not-a-digest")
    cache = EmbeddingCache(store, "ab" * 32)
    with pytest.raises(Exception, match="image id '../x' is not usable"):
        cache.path("../x", "full-1024")
    assert cache.get("0123", "full-1024") is None  # nothing there: a miss


# ---------------------------------------------------------------------------- evaluation, stats


def test_heldout_and_coco_evaluation_use_the_cache(tmp_path, scenes, model):
    """The held-out evaluation's 1-click scores are the same cold and warm (and close with the
    cache off); ``maskmill eval`` keys its images like the store's, so it reads those entries."""
    images, annotations = scenes
    import_coco(annotations, images, str(tmp_path / "store"))
    store = Store(str(tmp_path / "store"))
    plan = make_plan(store, 1, 0, auto=False, holdout=0.5)
    truth = heldout_truth(store, plan)
    assert list(truth) == plan.heldout and len(truth) == 1
    cache = open_embedding_cache(store, model)

    def scores(cache) -> dict[str, np.ndarray]:
        samples = heldout_samples(store, plan)
        return interactive_scores(model, samples, 1, cache=cache, image_ids=list(truth))

    cold = scores(cache)
    files = entry_files(store)
    assert len(files) == 1 and f"/{plan.heldout[0]}/" in next(iter(files))
    warm = scores(cache)
    assert entry_files(store) == files
    assert all(np.array_equal(cold[k], warm[k]) for k in cold)
    off = scores(None)
    assert len(off["best"]) == len(cold["best"]) > 0
    np.testing.assert_allclose(off["best"], cold["best"], atol=0.02)
    with pytest.raises(ValueError, match="needs the samples' image_ids"):
        interactive_scores(model, heldout_samples(store, plan), 1, cache=cache)

    # maskmill eval on the same files (COCO order: the first image) reads the entry of the
    # store's image of that file.
    first_id = read_image_info(str(Path(images) / "000000.png")).image_id
    first_image = load_stored_image(plan.images[first_id])
    image_embedding(Predictor(model), first_id, first_image, cache)
    files = entry_files(store)
    metrics = evaluate_coco(model, annotations, images, 1, 2, embedding_cache=cache)
    assert entry_files(store) == files  # a hit
    assert metrics["images"] == 1 and metrics["masks"] > 0
    assert 0.0 <= metrics["one_click_miou_best"] <= 1.0


def test_stats_report_the_cache_size(tmp_path, scenes, model):
    store, plan, _ = make_store(tmp_path / "store", scenes, model)
    cache = open_embedding_cache(store, model)
    predictor = Predictor(model)
    for image_id in sorted(plan.images)[:2]:
        image_embedding(predictor, image_id, load_stored_image(plan.images[image_id]), cache)
    # A writer's temp file in progress is not an entry.
    folder = Path(cache.path(sorted(plan.images)[0], "full-512")).parent
    (folder / ".full-512.npz.0123.tmp").write_bytes(b"x" * 100)
    with Catalog(store) as catalog:
        stats = compute_stats(catalog)
    files = entry_files(store)
    sizes = sum(os.path.getsize(p) for p in files)
    assert stats["embedding_cache"] == {"entries": 2, "bytes": sizes, "encoders": 1}
    assert sizes > 2 * 128 * 32 * 32 * 2  # two float16 (1, 128, 32, 32) arrays and headers
    assert f"embedding cache  2 embeddings, {sizes / 1024:.1f} kB (1 image encoder)" in (
        format_stats(stats)
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["serve", "--store", "s"],
        ["prompt-boxes", "--store", "s", "--detections", "d.json"],
        ["eval", "--annotations", "a.json", "--images", "i"],
    ],
)
def test_every_encoding_command_has_the_opt_out_and_the_encoder_precision(argv):
    parser = build_parser()
    on, off = parser.parse_args(argv), parser.parse_args([*argv, "--no-embedding-cache"])
    assert off.embedding_cache is False
    assert on.embedding_cache is (None if argv == ["run"] else True)
    assert on.encoder_precision is None  # the command's default: fp32
    bf16 = parser.parse_args([*argv, "--encoder-precision", "bf16"])
    assert bf16.encoder_precision == "bf16"
    if argv == ["run"]:  # None: the settings' own defaults (on, fp32) apply
        assert not {"embedding_cache", "encoder_precision"} & set(settings_values(on))
        assert settings_values(off)["embedding_cache"] is False
        assert settings_values(bf16)["encoder_precision"] == "bf16"


def test_engine_settings_check_the_encoder_precision():
    from pydantic import ValidationError

    from maskmill.engine.run import EngineSettings

    assert EngineSettings().encoder_precision == "fp32"
    assert EngineSettings(encoder_precision="bf16").model_dump()["encoder_precision"] == "bf16"
    with pytest.raises(ValidationError, match="'fp32', 'bf16' or 'fp16'"):
        EngineSettings(encoder_precision="int8")
    # The run's own option, not a generator threshold: refused as a generator option.
    with pytest.raises(ValidationError, match="encoder_precision"):
        EngineSettings(generator_options={"encoder_precision": "bf16"})

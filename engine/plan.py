"""What a data-engine run works on: its images, ground truth, held-out split, per-round image
sets and model versions. Everything here is a deterministic function of the store and the seed,
so a rerun of the same command finds the same plan and skips what is done.

Rounds: ground truth is round 0; assisted-manual rounds are 1..M, semi-automatic rounds
M+1..M+S, the fully automatic pass M+S+1. Manual and semi rounds each annotate their own share
of the images (as SAM's rounds annotated new images); the automatic pass covers every image.

Validation: of each manual and semi round's images a share (``VALIDATION_SHARE``) is annotated as
usual but never trained on; a retrain's candidate is promoted on its 1-click mIoU over those
images' annotated masks. The held-out images are never validation images: they only report.

Model versions (``<store>/models/v<N>``): v1 is the starting checkpoint (meta ``round`` 0); the
retrain after round r writes the next version with meta ``round`` r and ``promoted`` true or
false. Round r uses the newest *promoted* version whose meta ``round`` is below r (a version
whose meta does not say, like v1, counts as promoted).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from maskmill.engine.embeddings import open_embedding_cache, set_image
from maskmill.engine.evaluate import MAX_CLICKS, evaluate_interactive
from maskmill.model import Predictor, generator_presets, load_model
from maskmill.model.checkpoint import checkpoint_payload
from maskmill.storage import Store, rle
from maskmill.storage.embeddings import EmbeddingCache
from maskmill.storage.images import ImageInfo, load_image
from maskmill.storage.queries import ground_truth, image_infos, training_set
from maskmill.storage.writer import utc_now

# Held-out evaluation: at most this many ground-truth masks per image (the largest), so that
# evaluating a model stays a few seconds on a CPU.
HELDOUT_MASKS_PER_IMAGE = 20
# Of each annotated round's images, this share (at least one when the round has two or more)
# is kept out of training to decide promotion: one image in five costs a round a fifth of its
# training data, and is the fewest that still gives every round of two or more images a say.
VALIDATION_SHARE = 0.2


@dataclass
class Plan:
    """The images of a run and who does what with them.

    Attributes:
        images: every image of the store, by id.
        heldout: ids kept out of annotation and training, for the 1-click mIoU of each model.
        manual: per assisted-manual round, the ids it annotates.
        semi: per semi-automatic round, the ids it annotates.
        auto: the ids of the automatic pass (all images).
        validation: ids among the manual and semi rounds' that are annotated but never trained
            on: a retrain is promoted on them (sorted; disjoint from ``heldout``).
    """

    images: dict[str, ImageInfo]
    heldout: list[str]
    manual: list[list[str]] = field(default_factory=list)
    semi: list[list[str]] = field(default_factory=list)
    auto: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)

    def rounds(self) -> list[tuple[int, str, list[str]]]:
        """(round, stage, image ids) of every round, in order."""
        out = [(i + 1, "manual", ids) for i, ids in enumerate(self.manual)]
        out += [(len(self.manual) + i + 1, "semi", ids) for i, ids in enumerate(self.semi)]
        if self.auto:
            out.append((len(self.manual) + len(self.semi) + 1, "auto", self.auto))
        return out


# --------------------------------------------------------------------------------------- the plan


def make_plan(
    store: Store,
    manual_rounds: int,
    semi_rounds: int,
    auto: bool = True,
    seed: int = 0,
    holdout: float = 0.25,
    validation: float = VALIDATION_SHARE,
) -> Plan:
    """Split the store's images into held-out, per-round and automatic sets, by ``seed``.

    The held-out share is taken from images with ground truth (at least one image when there
    is ground truth and ``holdout`` > 0); the rest is dealt round-robin, in a seeded order, to
    the manual and semi rounds. Of each round's images, ``round(validation x n)`` (at least one
    when n >= 2 and ``validation`` > 0; never all of them) are validation images, drawn in a
    second seeded order. Without ground truth there is nothing to hold out or to simulate
    annotation from: manual and semi rounds then need an annotator of their own.
    """
    if not 0.0 <= validation < 1.0:
        raise ValueError(f"validation must be a share in [0, 1), got {validation}")
    images = image_infos(store)
    with_gt = sorted(ground_truth(store))
    ordered = sorted(with_gt, key=lambda i: _rank(seed, i))
    n_held = 0 if not ordered or holdout <= 0 else max(1, round(holdout * len(ordered)))
    n_held = min(n_held, max(0, len(ordered) - (manual_rounds + semi_rounds)))
    heldout = sorted(ordered[:n_held])
    rest = ordered[n_held:]
    n_rounds = manual_rounds + semi_rounds
    shares: list[list[str]] = [sorted(rest[i::n_rounds]) for i in range(n_rounds)]
    return Plan(
        images=images,
        heldout=heldout,
        manual=shares[:manual_rounds],
        semi=shares[manual_rounds:],
        auto=sorted(images) if auto else [],
        validation=sorted(
            i for share in shares for i in _validation_share(share, validation, seed)
        ),
    )


def _validation_share(ids: list[str], share: float, seed: int) -> list[str]:
    """The validation images of one round's ``ids``: the first ``round(share x n)`` (at least
    one when n >= 2 and ``share`` > 0, at most n - 1) in a seeded order of their own."""
    if len(ids) < 2 or share <= 0:
        return []
    count = min(len(ids) - 1, max(1, round(share * len(ids))))
    return sorted(ids, key=lambda i: _rank(seed, i, "validation"))[:count]


def _rank(seed: int, image_id: str, purpose: str = "") -> str:
    key = f"{seed}\x1f{image_id}" + (f"\x1f{purpose}" if purpose else "")
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


# --------------------------------------------------------------------------------- model versions


def model_bytes(model: torch.nn.Module, metadata: dict[str, Any]) -> bytes:
    """A model in maskmill's checkpoint format, as bytes for ``Store.write_model``."""
    buffer = io.BytesIO()
    torch.save(checkpoint_payload(model, metadata), buffer)
    return buffer.getvalue()


def ensure_initial_model(
    store: Store,
    plan: Plan,
    checkpoint: str | None = None,
    progress: bool = False,
    embedding_cache: bool = True,
) -> dict[str, Any]:
    """Store the starting model as v1 (with its held-out 1-click mIoU, the held-out images
    encoded through the store's embedding cache unless ``embedding_cache`` is off) unless the
    store has models already; return the newest model's meta."""
    metas = store.model_metas()
    if metas:
        return metas[-1]
    model, source = load_model(checkpoint)
    metrics = evaluate_heldout(
        store, plan, model, progress=progress, embedding_cache=embedding_cache
    )
    # The generator thresholds travel with the weights: v1 keeps its source's presets (SAM's
    # for an official file), and every retrain starts from them.
    presets = generator_presets(model)
    meta = {
        "round": 0,
        "source": source,
        "config": model.config.to_dict(),
        "generator_presets": presets,
        "metrics": metrics,
        "created_at": utc_now().isoformat(),
    }
    checkpoint_meta = {"round": 0, "source": source, "generator_presets": presets}
    store.write_model(1, model_bytes(model, checkpoint_meta), meta)
    return store.model_metas()[-1]


def model_for_round(store: Store, round_: int) -> dict[str, Any]:
    """Meta (with ``uri``) of the model round ``round_`` uses: the newest promoted version
    trained before it (meta ``round`` below ``round_``; a meta without ``promoted`` counts as
    promoted)."""
    metas = [
        m
        for m in store.model_metas()
        if int(m.get("round") or 0) < round_ and m.get("promoted", True)
    ]
    if not metas:
        raise LookupError(f"{store.url}: no promoted model version from before round {round_}")
    return metas[-1]


def current_model(store: Store | str) -> dict[str, Any]:
    """Meta (with ``uri``) of the model the store's next round would use: its newest promoted
    version (what ``maskmill segment --store`` and ``serve`` mean by the store's model).

    Raises:
        NotAStoreError: ``store`` is a URL with no store. ValueError: it has no model yet.
    """
    store = (Store(store) if isinstance(store, str) else store).require()
    metas = [m for m in store.model_metas() if m.get("promoted", True)]
    if not metas:
        raise ValueError(f"{store.url}: no model yet (a `maskmill run` stores its first)")
    return metas[-1]


def concept_model(store: Store | str, clip: bool = False) -> dict[str, Any]:
    """Meta of the store's model for concept prompts: :func:`current_model` when it has a
    concept head, else the newest version that has one (a retrain whose weights were not
    promoted still learned the store's concepts; meta ``concepts`` lists them). With ``clip``:
    the same for CLIP text prompts (meta ``text_prompts``).

    Raises:
        ValueError: no version of the store has learned them.
    """
    store = (Store(store) if isinstance(store, str) else store).require()
    key = "text_prompts" if clip else "concepts"
    current = current_model(store)
    if current.get(key):
        return current
    learned = [m for m in store.model_metas() if m.get(key)]
    if learned:
        return learned[-1]
    if clip:
        raise ValueError(
            f"{store.url}: no model version has CLIP text prompts; run with --clip-model, or "
            "train them with `maskmill fit-text`"
        )
    raise ValueError(
        f"{store.url}: no model version has learned concepts; retrain on masks with "
        "categories (import-coco with categories, or categories given while annotating)"
    )


def evaluate_heldout(
    store: Store,
    plan: Plan,
    model: torch.nn.Module,
    progress: bool = False,
    embedding_cache: bool = True,
) -> dict[str, float]:
    """1-click mIoU and NoC@90 of ``model`` on the held-out images' ground truth (``maskmill
    eval``'s protocol: 20 clicks at most, a mask never reaching IoU 0.9 counts 20). The images
    are encoded through the store's embedding cache (``engine.embeddings``) unless
    ``embedding_cache`` is off, so a retrained model with the encoder frozen encodes none.

    Returns ``{"heldout_miou": best-of-3 mean, "heldout_miou_top1": IoU-head pick,
    "heldout_noc90": mean clicks to IoU 0.9, "heldout_masks": n}``; empty when nothing is held
    out.
    """
    truth = heldout_truth(store, plan)
    samples = _progress(_samples(plan, truth), "held-out mIoU", progress)
    cache = open_embedding_cache(store if embedding_cache else None, model)
    scores = interactive_scores(model, samples, cache=cache, image_ids=list(truth))
    if scores is None:
        return {}
    return {
        "heldout_miou": float(scores["best"].mean()),
        "heldout_miou_top1": float(scores["top1"].mean()),
        "heldout_noc90": float(scores["noc90"].mean()),
        "heldout_masks": len(scores["best"]),
    }


def interactive_scores(
    model: torch.nn.Module,
    samples: Iterable[tuple[np.ndarray, list[dict[str, Any]]]],
    max_clicks: int = MAX_CLICKS,
    cache: EmbeddingCache | None = None,
    image_ids: Sequence[str] | None = None,
) -> dict[str, np.ndarray] | None:
    """Per mask, ``evaluate_interactive``'s scores of ``model`` on ``samples`` ((H, W, 3) uint8
    images, each with its reference COCO RLEs, of which the ``HELDOUT_MASKS_PER_IMAGE`` largest
    count): ``{"best": 1-click best-of-3 IoU, "top1": 1-click IoU-head pick, "noc90": clicks to
    IoU 0.9}``, (n,) each (``noc90`` is ``max_clicks`` wherever it is never reached, all of it
    with ``max_clicks`` 1). None when no sample has a non-empty mask.

    ``cache`` (``model``'s embedding cache) with ``image_ids`` (the samples' image ids, in
    order): embeddings are read from it where there and written where not."""
    if cache is not None and image_ids is None:
        raise ValueError("interactive_scores: a cache needs the samples' image_ids")
    predictor = Predictor(model)
    best, top1, noc90 = [], [], []
    with torch.inference_mode():
        for index, (image, objects) in enumerate(samples):
            largest = np.argsort(-rle.areas(objects), kind="stable")[:HELDOUT_MASKS_PER_IMAGE]
            masks = [rle.decode(objects[i]) for i in largest]
            masks = [m for m in masks if m.any()]
            if not masks:
                continue
            image_id = image_ids[index] if image_ids is not None else None
            set_image(predictor, image_id, image, cache)
            result = evaluate_interactive(predictor, np.stack(masks), max_clicks=max_clicks)
            best.append(result.one_click_best)
            top1.append(result.one_click_top1)
            noc90.append(result.noc[0.90])
    if not best:
        return None
    return {
        "best": np.concatenate(best),
        "top1": np.concatenate(top1),
        "noc90": np.concatenate(noc90),
    }


def validation_samples(
    store: Store, plan: Plan, stages: Sequence[str], before_round: int, min_mask_area: int = 64
) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
    """The validation images annotated before ``before_round``, each read as stored ((H, W, 3)
    uint8 RGB, no EXIF turn) with the COCO RLEs of its masks of ``stages`` (the annotators'
    accepted masks: the truth a data engine has), at least ``min_mask_area`` pixels."""
    annotated = training_set(
        store, stages, before_round, plan.heldout, min_mask_area, only=plan.validation
    )
    return [(load_image(s["uri"], exif_transpose=False), s["masks"]) for s in annotated]


def evaluate_validation(
    model: torch.nn.Module, samples: list[tuple[np.ndarray, list[dict[str, Any]]]]
) -> dict[str, float]:
    """1-click mIoU (best of 3, ``evaluate_heldout``'s protocol) of ``model`` on validation
    ``samples`` (:func:`validation_samples`): ``{"miou", "masks", "images"}``; empty when
    there is no mask to score."""
    scores = interactive_scores(model, samples, max_clicks=1)
    if scores is None:
        return {}
    return {
        "miou": float(scores["best"].mean()),
        "masks": len(scores["best"]),
        "images": len(samples),
    }


def heldout_truth(
    store: Store, plan: Plan, limit: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The first ``limit`` held-out images with ground truth (by id, in order): their
    ground-truth COCO RLEs by image id."""
    if not plan.heldout:
        return {}
    truth = ground_truth(store)
    with_truth = [image_id for image_id in plan.heldout if truth.get(image_id)]
    return {image_id: truth[image_id] for image_id in with_truth[:limit]}


def heldout_samples(
    store: Store, plan: Plan, limit: int | None = None
) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """The held-out images (the first ``limit`` with ground truth, by id), read one at a time
    as stored ((H, W, 3) uint8 RGB, no EXIF turn), each with its ground-truth COCO RLEs."""
    return _samples(plan, heldout_truth(store, plan, limit))


def _samples(
    plan: Plan, truth: dict[str, list[dict[str, Any]]]
) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    for image_id, objects in truth.items():
        yield load_image(plan.images[image_id].uri, exif_transpose=False), objects


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="image", leave=False)


def plan_summary(plan: Plan) -> str:
    """One line per round: what it works on (for logs)."""
    lines = [f"held-out: {len(plan.heldout)} images, validation: {len(plan.validation)} images"]
    lines += [f"round {r} {stage}: {len(ids)} images" for r, stage, ids in plan.rounds()]
    return "\n".join(lines)

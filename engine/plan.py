"""What a data-engine run works on: its images, ground truth, held-out split, per-round image
sets and model versions. Everything here is a deterministic function of the store and the seed,
so a rerun of the same command finds the same plan and skips what is done.

Rounds: ground truth is round 0; assisted-manual rounds are 1..M, semi-automatic rounds
M+1..M+S, the fully automatic pass M+S+1. Manual and semi rounds each annotate their own share
of the images (as SAM's rounds annotated new images); the automatic pass covers every image.

Model versions (``<store>/models/v<N>``): v1 is the starting checkpoint (meta ``round`` 0); the
retrain after round r writes the next version with meta ``round`` r. Round r uses the newest
version whose meta ``round`` is below r.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch

from maskmill.engine.evaluate import evaluate_interactive
from maskmill.engine.images import BadImageError, load_image
from maskmill.model import Predictor, has_default, load_checkpoint, load_default
from maskmill.model.checkpoint import checkpoint_payload
from maskmill.storage import Catalog, StageWriter, Store, rle
from maskmill.storage.images import ImageInfo, images_table, read_image_info
from maskmill.storage.schema import STAGE_GT
from maskmill.storage.writer import utc_now

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)
INGEST_ROUND, INGEST_STAGE = 0, "ingest"
# Held-out evaluation: at most this many ground-truth masks per image (the largest), so that
# evaluating a model stays a few seconds on a CPU.
HELDOUT_MASKS_PER_IMAGE = 20


@dataclass(frozen=True)
class ImageRow:
    """An image of the store: id, URI and stored pixel size (H, W)."""

    image_id: str
    uri: str
    height: int
    width: int


@dataclass
class Plan:
    """The images of a run and who does what with them.

    Attributes:
        images: every image of the store, by id.
        heldout: ids kept out of annotation and training, for the 1-click mIoU of each model.
        manual: per assisted-manual round, the ids it annotates.
        semi: per semi-automatic round, the ids it annotates.
        auto: the ids of the automatic pass (all images).
    """

    images: dict[str, ImageRow]
    heldout: list[str]
    manual: list[list[str]] = field(default_factory=list)
    semi: list[list[str]] = field(default_factory=list)
    auto: list[str] = field(default_factory=list)

    def rounds(self) -> list[tuple[int, str, list[str]]]:
        """(round, stage, image ids) of every round, in order."""
        out = [(i + 1, "manual", ids) for i, ids in enumerate(self.manual)]
        out += [(len(self.manual) + i + 1, "semi", ids) for i, ids in enumerate(self.semi)]
        if self.auto:
            out.append((len(self.manual) + len(self.semi) + 1, "auto", self.auto))
        return out


# ----------------------------------------------------------------------------- images in a store


def ingest_folder(store: Store, images: str, progress: bool = False) -> dict[str, int]:
    """Register every image file under ``images`` (folder path or fsspec URL) in the images
    table; files that are no readable image go to the failures table (round 0, stage
    ``ingest``) with the reason. Idempotent: the same folder gives the same shards.

    Returns:
        ``{"images": registered, "failures": refused}``, or ``{"skipped": 1}`` when this
        folder, with the same files, was registered before.
    """
    fs, root = fsspec.core.url_to_fs(images)
    if not fs.isdir(root):
        raise FileNotFoundError(f"--images {images}: no such folder")
    paths = sorted(
        p
        for p in fs.find(root)
        if p.lower().endswith(IMAGE_EXTENSIONS) and not posixpath.basename(p).startswith(".")
    )
    if not paths:
        raise FileNotFoundError(
            f"--images {images}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it"
        )
    # The key names the folder and its file list: a rerun on the same folder finds its shard.
    listing = "\n".join([root, *paths]).encode()
    key = "folder-" + hashlib.blake2b(listing, digest_size=8).hexdigest()
    if store.fs.exists(store.shard_path("images", key)):
        return {"skipped": 1}
    infos: dict[str, ImageInfo] = {}
    failures = []
    for path in _progress(paths, "reading images", progress):
        uri = path if fs.protocol in ("file", ("file", "local")) else fs.unstrip_protocol(path)
        try:
            info = read_image_info(uri)
        except Exception as error:  # noqa: BLE001 - any unreadable file is recorded, not fatal
            failures.append({"uri": uri, "error": _ingest_reason(uri, error)})
            continue
        infos.setdefault(info.image_id, info)  # the same content twice is one image
    if failures:  # failures first: the images shard marks the folder as done
        with StageWriter(store, INGEST_ROUND, INGEST_STAGE) as writer:
            writer.write_failures(key, failures)
    if infos:
        ordered = [infos[i] for i in sorted(infos)]
        store.write_shard("images", images_table(ordered, utc_now()), key)
    return {"images": len(infos), "failures": len(failures)}


def _ingest_reason(uri: str, error: Exception) -> str:
    """The failures-table message of a file the images table cannot take."""
    try:  # decode it fully to name the reason the way the stages do
        load_image(uri, exif_transpose=False)
    except BadImageError as bad:
        return str(bad)
    return f"{uri}: unreadable: {type(error).__name__}: {error}"


def image_rows(store: Store) -> dict[str, ImageRow]:
    """Every image of the store, by id."""
    with Catalog(store) as catalog:
        rows = catalog.con.execute(
            "SELECT image_id, uri, height, width FROM images ORDER BY image_id"
        ).fetchall()
    return {r[0]: ImageRow(r[0], r[1], int(r[2]), int(r[3])) for r in rows}


def ground_truth(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Ground-truth RLEs (round 0, stage ``gt``) of every image, by image id, in stored order."""
    if not store.shards("masks"):
        return {}
    with Catalog(store) as catalog:
        rows = catalog.con.execute(
            f"SELECT image_id, segmentation, height, width FROM {catalog.scan('masks')} "
            "WHERE stage = ? AND NOT iscrowd ORDER BY image_id, filename, file_row_number",
            [STAGE_GT],
        ).fetchall()
    out: dict[str, list[dict[str, Any]]] = {}
    for image_id, counts, height, width in rows:
        out.setdefault(image_id, []).append({"size": [height, width], "counts": counts})
    return out


def existing_masks(store: Store, image_id: str, before_round: int) -> list[dict[str, Any]]:
    """RLEs of the non-ground-truth masks an image got in rounds before ``before_round``."""
    if not store.shards("masks"):
        return []
    with Catalog(store) as catalog:
        rows = catalog.con.execute(
            "SELECT segmentation, height, width FROM masks WHERE image_id = ? AND round < ? "
            "AND stage <> ? ORDER BY round, stage, mask_id",
            [image_id, before_round, STAGE_GT],
        ).fetchall()
    return [{"size": [h, w], "counts": c} for c, h, w in rows]


# --------------------------------------------------------------------------------------- the plan


def make_plan(
    store: Store,
    manual_rounds: int,
    semi_rounds: int,
    auto: bool = True,
    seed: int = 0,
    holdout: float = 0.25,
) -> Plan:
    """Split the store's images into held-out, per-round and automatic sets, by ``seed``.

    The held-out share is taken from images with ground truth (at least one image when there
    is ground truth and ``holdout`` > 0); the rest is dealt round-robin, in a seeded order, to
    the manual and semi rounds. Without ground truth there is nothing to hold out or to simulate
    annotation from: manual and semi rounds then need an annotator of their own.
    """
    images = image_rows(store)
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
    )


def _rank(seed: int, image_id: str) -> str:
    return hashlib.blake2b(f"{seed}\x1f{image_id}".encode(), digest_size=8).hexdigest()


# --------------------------------------------------------------------------------- model versions


def model_bytes(model: torch.nn.Module, metadata: dict[str, Any]) -> bytes:
    """A model in maskmill's checkpoint format, as bytes for ``Store.write_model``."""
    buffer = io.BytesIO()
    torch.save(checkpoint_payload(model, metadata), buffer)
    return buffer.getvalue()


def ensure_initial_model(
    store: Store, plan: Plan, checkpoint: str | None = None, progress: bool = False
) -> dict[str, Any]:
    """Store the starting model as v1 (with its held-out 1-click mIoU) unless the store has
    models already; return the newest model's meta."""
    metas = store.model_metas()
    if metas:
        return metas[-1]
    if checkpoint:
        model, source = load_checkpoint(checkpoint), checkpoint
    elif has_default():
        model, source = load_default(), "maskmill default"
    else:
        raise FileNotFoundError(
            "no --checkpoint given and this build ships no default model "
            "(model/weights/default.pt); pass --checkpoint FILE"
        )
    metrics = evaluate_heldout(store, plan, model, progress=progress)
    meta = {
        "round": 0,
        "source": source,
        "config": model.config.to_dict(),
        "metrics": metrics,
        "created_at": utc_now().isoformat(),
    }
    store.write_model(1, model_bytes(model, {"round": 0, "source": source}), meta)
    return store.model_metas()[-1]


def model_for_round(store: Store, round_: int) -> dict[str, Any]:
    """Meta (with ``uri``) of the model round ``round_`` uses: the newest trained before it."""
    metas = [m for m in store.model_metas() if int(m.get("round") or 0) < round_]
    if not metas:
        raise LookupError(f"{store.url}: no model version from before round {round_}")
    return metas[-1]


def evaluate_heldout(
    store: Store, plan: Plan, model: torch.nn.Module, progress: bool = False
) -> dict[str, float]:
    """1-click mIoU of ``model`` on the held-out images' ground truth.

    Returns ``{"heldout_miou": best-of-3 mean, "heldout_miou_top1": IoU-head pick,
    "heldout_masks": n}``; empty when nothing is held out.
    """
    if not plan.heldout:
        return {}
    truth = ground_truth(store)
    predictor = Predictor(model)
    best, top1 = [], []
    with torch.inference_mode():
        for image_id in _progress(plan.heldout, "held-out mIoU", progress):
            row = plan.images[image_id]
            objects = truth.get(image_id, [])
            largest = np.argsort(-rle.areas(objects), kind="stable")[:HELDOUT_MASKS_PER_IMAGE]
            masks = [rle.decode(objects[i]) for i in largest]
            masks = [m for m in masks if m.any()]
            if not masks:
                continue
            predictor.set_image(load_image(row.uri, exif_transpose=False))
            # One click only: the evaluation's own protocol, without its 20-click NoC loop.
            result = evaluate_interactive(predictor, np.stack(masks), max_clicks=1)
            best.append(result.one_click_best)
            top1.append(result.one_click_top1)
    if not best:
        return {}
    return {
        "heldout_miou": float(np.concatenate(best).mean()),
        "heldout_miou_top1": float(np.concatenate(top1).mean()),
        "heldout_masks": int(sum(len(b) for b in best)),
    }


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="image", leave=False)


def plan_summary(plan: Plan) -> str:
    """One line per round: what it works on (for logs)."""
    lines = [f"held-out: {len(plan.heldout)} images"]
    lines += [f"round {r} {stage}: {len(ids)} images" for r, stage, ids in plan.rounds()]
    return "\n".join(lines)

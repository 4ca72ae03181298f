"""Boxes from a detector -> instance masks: stage ``boxes``.

A detector's boxes, as a COCO *results* file (a JSON list of ``{"image_id" | "file_name",
"bbox": [x, y, w, h], "category_id", "score"}``, ``bbox`` XYWH pixels, ``category_name``
optional), each prompt the model once (box prompt, XYXY pixels, single-mask output): one mask
per detection, stored in the masks table as stage ``boxes`` with the detection's category and
score, ``source`` ``detector`` (:data:`SOURCE`), the model's predicted IoU and version.

Reading (:func:`read_detections`) never stops at a bad row: each becomes a failure row naming
the row (``detections[i]``) and what is wrong with it (unknown image or category, a box that is
not finite, has no area or lies wholly outside its image, a missing field, a score that is not
a finite number); a box reaching past its image's edge is clipped to it and counted. Only a
file that is not JSON, or not a list, is an error of its own (nothing is written).

The unit of work is one image (its masks one shard keyed by the image id, through
:class:`~storage.StageWriter`), so a rerun skips the images done and a killed run resumes. The
stage runs in its own round: by default the round of an earlier run of the same detections
(their content digest, ``detections_digest`` in the rounds row's metrics, written when the run
starts and again when it ends), else one past every round of the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_area, box_convert, clip_boxes_to_image

from maskmill.engine.embeddings import open_embedding_cache, set_image
from maskmill.engine.plan import current_model
from maskmill.engine.stages import _bar, stage_metrics
from maskmill.model import EncoderPrecision, Predictor, encoder_autocast_dtype, load_model
from maskmill.storage import StageWriter, Store, rle
from maskmill.storage.coco import load_coco_json, read_json
from maskmill.storage.embeddings import EmbeddingCache
from maskmill.storage.images import ImageInfo
from maskmill.storage.queries import categories, image_infos, stage_figures, stage_progress

STAGE = "boxes"
SOURCE = "detector"  # the masks' ``source``: prompted by a detector's box
# Boxes per decoder call: bounds the (B, 1, H, W) masks in memory on big images.
BOX_CHUNK = 64
# Fields every row needs, besides ``image_id`` or ``file_name``.
REQUIRED = ("bbox", "category_id", "score")


@dataclass(frozen=True)
class Detection:
    """One usable row of a detections file.

    Attributes:
        index: the row's place in the file (``detections[index]``).
        image_id: the store's image id.
        box: XYXY pixels, clipped to the image.
        category_id: the detection's category id.
        category: its name (the store's, or the row's ``category_name``).
        score: the detector's score.
        clipped: whether the box reached past the image's edge (and was clipped).
    """

    index: int
    image_id: str
    box: tuple[float, float, float, float]
    category_id: int
    category: str
    score: float
    clipped: bool


def load_detections(source: str | list[Any]) -> list[Any]:
    """The rows of a detections file (any fsspec URL), or ``source`` itself when it is a list.

    Raises:
        ValueError: naming the file when it is missing, not JSON, or not a JSON list.
    """
    if isinstance(source, list):
        return source
    data = read_json(source, "detections file")
    if not isinstance(data, list):
        raise ValueError(
            f"{source}: not a COCO results file: the top level is a JSON "
            f"{type(data).__name__ if not isinstance(data, dict) else 'object'}, not a list of "
            "detections"
        )
    return data


def detections_digest(rows: list[Any]) -> str:
    """Content digest of detection rows (32 hex digits): the same rows, the same digest, however
    the file is laid out."""
    text = json.dumps(rows, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """A number that is neither NaN nor infinite (nor an integer too big for a float)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


class _Images:
    """Finds the store image a detection names: by the store's image id, by a file name (a
    trailing part of the image's URI), or by a COCO image id of ``annotations``."""

    def __init__(self, infos: Iterable[ImageInfo], annotations: str | None) -> None:
        self.by_id = {info.image_id: info for info in infos}
        self.by_name: dict[str, list[ImageInfo]] = {}  # by the URI's last part
        for info in self.by_id.values():
            self.by_name.setdefault(posixpath.basename(info.uri), []).append(info)
        self.annotations = annotations
        self.coco: dict[int, dict[str, Any]] = {}
        self.coco_categories: dict[int, str] = {}
        if annotations is not None:
            data = load_coco_json(annotations)
            for entry in data["images"]:
                if isinstance(entry, dict) and _is_int(entry.get("id")):
                    self.coco[entry["id"]] = entry
            for cat in data.get("categories", []):
                if isinstance(cat, dict) and _is_int(cat.get("id")) and "name" in cat:
                    self.coco_categories[cat["id"]] = str(cat["name"])

    def by_file(self, file_name: str) -> tuple[ImageInfo | None, str | None]:
        """The image whose URI is ``file_name`` or ends with ``/`` + it."""
        path = posixpath.normpath(file_name)
        matches = [
            info
            for info in self.by_name.get(posixpath.basename(path), [])
            if info.uri == file_name or info.uri.endswith("/" + path.lstrip("/"))
        ]
        if len(matches) == 1:
            return matches[0], None
        if not matches:
            return None, f"file_name {file_name!r} is not an image of the store"
        uris = ", ".join(sorted(info.uri for info in matches)[:3])
        return None, (
            f"file_name {file_name!r} matches {len(matches)} images of the store ({uris}); "
            "give more of its path"
        )

    def find(self, row: dict[str, Any]) -> tuple[ImageInfo | None, str | None]:
        """(the image, None), or (None, why not)."""
        if "image_id" in row:
            image_id = row["image_id"]
            if _is_int(image_id):
                entry = self.coco.get(image_id)
                if entry is None:
                    return (
                        None,
                        f"image_id {image_id} is not among the images of {self.annotations}",
                    )
                stored = entry.get("maskmill_image_id")  # a maskmill export names it
                if isinstance(stored, str) and stored in self.by_id:
                    return self.by_id[stored], None
                if not isinstance(entry.get("file_name"), str):
                    return None, f"image_id {image_id} has no file_name in {self.annotations}"
                info, error = self.by_file(entry["file_name"])
                return info, error and f"image_id {image_id}: {error}"
            if isinstance(image_id, str) and image_id in self.by_id:
                return self.by_id[image_id], None
            return None, (
                f"image_id {image_id!r} is not an image of the store (its ids are the first 16 "
                "hex digits of the file's SHA-256; COCO's integer ids need the COCO file)"
            )
        if isinstance(row.get("file_name"), str) and row["file_name"]:
            return self.by_file(row["file_name"])
        return None, f"file_name {row.get('file_name')!r} is not a file name"


def read_detections(
    source: str | list[dict[str, Any]],
    images: Mapping[str, ImageInfo] | Iterable[ImageInfo],
    categories: Mapping[str, int | None] | None = None,
    annotations: str | None = None,
) -> tuple[dict[str, list[Detection]], list[dict[str, Any]]]:
    """Parse a COCO results file (or its rows) against the store's images and categories.

    A row names its image by ``file_name`` (matched against the end of the images' URIs:
    ``000001.png``, ``images/000001.png``, or the whole URI) or ``image_id``: the store's image
    id (a string), or an integer COCO image id of ``annotations`` (the COCO file the detector
    ran on: the imported instances file, whose ``file_name`` then finds the image, or a
    ``maskmill export``, whose ``maskmill_image_id`` does). ``bbox`` is XYWH pixels. A
    ``category_id`` must be one of ``categories`` (the store's, ``storage.queries.categories``:
    name -> id) or of ``annotations``, unless the row gives its ``category_name``.

    Args:
        source: the file (any fsspec URL) or its rows.
        images: the store's images (``storage.queries.image_infos``).
        categories: the store's categories, name -> id.
        annotations: the COCO file whose integer image ids the rows use.

    Returns:
        (detections by image id, each image's in file order; failure rows ``{"image_id",
        "uri", "error"}`` with ``error`` ``detections[i]: <what is wrong>``; ``image_id`` and
        ``uri`` are the image's when the row found one, else None).

    Raises:
        ValueError: the file is missing, not JSON or not a list; or rows use integer image ids
            and no ``annotations`` says which images those are.
        CocoFormatError: ``annotations`` is not a COCO file.
    """
    rows = load_detections(source)
    infos = images.values() if isinstance(images, Mapping) else images
    if annotations is None:
        first = next(
            (i for i, r in enumerate(rows) if isinstance(r, dict) and _is_int(r.get("image_id"))),
            None,
        )
        if first is not None:
            raise ValueError(
                f"detections[{first}]: image_id {rows[first]['image_id']} is a COCO image id: "
                "give the COCO file whose ids these are (--annotations: the imported instances "
                "file, or a maskmill export), or name images by file_name"
            )
    index = _Images(infos, annotations)
    names: dict[int, str] = dict(index.coco_categories)
    ids_of_name: dict[str, int] = {}
    for name, category_id in sorted((categories or {}).items()):
        if category_id is not None:
            names[category_id] = name  # the store's names win over the COCO file's
            ids_of_name[name] = category_id

    failures: list[tuple[int, dict[str, Any]]] = []  # (row, failure row)
    usable: dict[str, list[tuple[int, list[float], int, str, float]]] = {}
    for i, row in enumerate(rows):
        info, reason = _check_row(row, index, names, ids_of_name)
        if reason is not None:
            failures.append((i, _failure(i, info, reason)))
            continue
        category_id, name = _category(row, names, ids_of_name)
        box = [float(v) for v in row["bbox"]]
        usable.setdefault(info.image_id, []).append(
            (i, box, category_id, name, float(row["score"]))
        )

    found: dict[str, list[Detection]] = {}
    for image_id, entries in usable.items():
        info = index.by_id[image_id]
        # XYWH -> XYXY, clipped to the image (torchvision: XYXY, (H, W)).
        xywh = torch.tensor([e[1] for e in entries], dtype=torch.float64)
        xyxy = box_convert(xywh, "xywh", "xyxy")
        clipped = clip_boxes_to_image(xyxy, (info.height, info.width))
        inside = box_area(clipped) > 0
        changed = (clipped != xyxy).any(dim=1)
        for k, (i, box, category_id, name, score) in enumerate(entries):
            if not inside[k]:
                x, y, w, h = box
                reason = (
                    f"bbox [{x:g}, {y:g}, {w:g}, {h:g}] (XYWH) lies wholly outside its "
                    f"{info.width}x{info.height} (w x h) image"
                )
                failures.append((i, _failure(i, info, reason)))
                continue
            found.setdefault(image_id, []).append(
                Detection(
                    index=i,
                    image_id=image_id,
                    box=tuple(float(v) for v in clipped[k]),
                    category_id=category_id,
                    category=name,
                    score=score,
                    clipped=bool(changed[k]),
                )
            )
    return found, [failure for _, failure in sorted(failures, key=lambda f: f[0])]


def _failure(index: int, info: ImageInfo | None, reason: str) -> dict[str, Any]:
    """The failure row of detection ``index``: its image where it found one."""
    return {
        "image_id": info.image_id if info else None,
        "uri": info.uri if info else None,
        "error": f"detections[{index}]: {reason}",
    }


def _check_row(
    row: Any, index: _Images, names: dict[int, str], ids_of_name: dict[str, int]
) -> tuple[ImageInfo | None, str | None]:
    """(the row's image or None, what is wrong with the row or None), the box's place on the
    image aside (checked per image, with torchvision)."""
    if not isinstance(row, dict):
        return None, f"not a JSON object but {json.dumps(row, default=str)[:60]}"
    names_image = "image_id" in row or "file_name" in row
    info, image_error = index.find(row) if names_image else (None, None)
    missing = [] if names_image else ["image_id or file_name"]
    missing += [name for name in REQUIRED if name not in row]
    if missing:
        return info, "missing " + ", ".join(f"'{name}'" for name in missing)
    if info is None:
        return None, image_error
    reason = _box_problem(row["bbox"])
    if reason is None:
        category = _category(row, names, ids_of_name)
        reason = category if isinstance(category, str) else None
    score = row["score"]
    if reason is None and not _finite(score):
        reason = f"score {score!r} is not a finite number"
    return info, reason


def _box_problem(bbox: Any) -> str | None:
    """What is wrong with a row's ``bbox`` (XYWH pixels), or None."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return f"bbox {json.dumps(bbox)[:60]} is not [x, y, w, h] (4 numbers, XYWH pixels)"
    if not all(_finite(v) for v in bbox):
        return f"bbox {json.dumps(bbox)} is not finite"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"bbox {json.dumps(bbox)} has no area (width and height must be > 0, XYWH)"
    return None


def _category(
    row: dict[str, Any], names: dict[int, str], ids_of_name: dict[str, int]
) -> tuple[int, str] | str:
    """(category id, name) of a row, or what is wrong with it."""
    category_id, given = row["category_id"], row.get("category_name")
    if not _is_int(category_id):
        return f"category_id {category_id!r} is not an integer"
    if given is not None and not (isinstance(given, str) and given.strip()):
        return f"category_name {given!r} is not a name"
    known = names.get(category_id)
    if known is None and given is None:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(names.items())) or "none"
        return (
            f"unknown category_id {category_id}: not among the store's categories ({listed}) "
            "and no category_name given"
        )
    if known is not None and given is not None and given != known:
        return f"category_id {category_id} is {known!r} in the store, not {given!r}"
    if known is None and ids_of_name.get(given, category_id) != category_id:
        return f"category_name {given!r} is category_id {ids_of_name[given]} in the store"
    return category_id, known or given


@torch.inference_mode()
def box_masks(
    predictor: Predictor,
    image: np.ndarray,
    boxes: np.ndarray,
    chunk: int = BOX_CHUNK,
    image_id: str | None = None,
    cache: EmbeddingCache | None = None,
) -> list[dict[str, Any]]:
    """One mask per box: ``image`` (H, W, 3) uint8 RGB, ``boxes`` (N, 4) XYXY pixels on it.

    Each box prompts the model alone (single-mask output); records, in box order, carry
    ``segmentation`` (COCO compressed RLE of the (H, W) mask) and ``predicted_iou``. The
    image's embedding comes from ``cache`` (the model's embedding cache, keyed by
    ``image_id``) when there (``engine.embeddings.set_image``).
    """
    set_image(predictor, image_id, image, cache)
    records: list[dict[str, Any]] = []
    for start in range(0, len(boxes), chunk):
        masks, ious, _ = predictor.predict_batch(
            boxes=np.asarray(boxes[start : start + chunk], dtype=np.float32),
            multimask_output=False,
        )
        for mask, iou in zip(masks[:, 0].cpu().numpy(), ious[:, 0].float().cpu(), strict=True):
            records.append({"segmentation": rle.encode(mask), "predicted_iou": float(iou)})
    return records


def boxes_round(store: Store, digest: str) -> int:
    """The round of an earlier ``boxes`` run of the detections with this digest (the newest,
    finished or not), else one past every round the store has (masks or rounds rows)."""
    rows = store.read_table("rounds").to_pylist()
    same = [
        int(row["round"])
        for row in rows
        if row["stage"] == STAGE
        and json.loads(row["metrics"] or "{}").get("detections_digest") == digest
    ]
    if same:
        return max(same)
    started, _ = stage_progress(store)
    return 1 + max([0, *(int(row["round"]) for row in rows), *(r for r, _ in started)])


def prompt_boxes(
    store: Store | str,
    detections: str | list[dict[str, Any]],
    round_: int | None = None,
    checkpoint: str | None = None,
    workers: int = 1,
    progress: bool = False,
    annotations: str | None = None,
    use_ray: bool | None = None,
    embedding_cache: bool = True,
    encoder_precision: EncoderPrecision = "fp32",
) -> dict[str, Any]:
    """Prompt the model with every detection's box; store one mask per detection as stage
    ``boxes``; return the round's rows-table row (as the other stages), plus ``errors``: this
    run's failure messages (bad rows, then images that failed), which the table holds too.

    Args:
        store: the store (its images and categories name the detections' images and classes).
        detections: a COCO results file (any fsspec URL) or its rows (:func:`read_detections`).
        round_: the round to write (>= 1); default :func:`boxes_round`. An explicit round that
            has ``boxes`` already gets the images it lacks.
        checkpoint: the model; default the store's newest promoted model
            (``engine.plan.current_model``), else the shipped default. The masks record a
            store model's version, else none.
        workers: Ray actors (:class:`~engine.ray_pool.BoxPool`) when ``use_ray``.
        progress: a tqdm bar over the images.
        annotations: the COCO file whose integer image ids the detections use.
        use_ray: run on Ray actors (Ray initialised if it is not: a local cluster); default
            when ``workers`` > 1. Otherwise the images go through one model in this process.
        embedding_cache: encode through the store's embedding cache (``engine.embeddings``).
        encoder_precision: what the image encoder computes in (``Predictor``): ``"fp32"``, or
            ``"bf16"`` / ``"fp16"`` autocast.

    The rounds row's metrics: :func:`engine.stages.stage_metrics`, ``detections`` (rows in
    the file), ``detections_failed`` (rows refused), ``boxes_clipped``, ``detections_digest``,
    ``images_pending`` (images with detections not done yet: 0 once the run ends), ``workers``.
    """
    store = (store if isinstance(store, Store) else Store(store)).require()
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    encoder_autocast_dtype(encoder_precision)  # a bad name: refused before anything is written
    if round_ is not None and round_ < 1:
        raise ValueError(f"round must be at least 1 (round 0 is ground truth), got {round_}")
    rows = load_detections(detections)
    digest = detections_digest(rows)
    infos = image_infos(store)
    found, bad = read_detections(rows, infos, categories(store), annotations)
    round_ = boxes_round(store, digest) if round_ is None else int(round_)
    if checkpoint:
        model_meta: dict[str, Any] = {"version": None, "uri": checkpoint}
    else:
        try:
            model_meta = current_model(store)
        except ValueError:  # a store without models: the shipped default
            model_meta = {"version": None, "uri": None}
    version = model_meta.get("version")
    version = None if version is None else int(version)
    use_ray = workers > 1 if use_ray is None else use_ray
    extra = {
        "detections": len(rows),
        "detections_failed": len(bad),
        "boxes_clipped": sum(d.clipped for dets in found.values() for d in dets),
        "detections_digest": digest,
        "workers": workers if use_ray else 1,
    }
    errors = [f["error"] for f in bad]
    started = time.perf_counter()
    with StageWriter(store, round_, STAGE) as writer:
        jobs = [
            (infos[image_id], np.array([d.box for d in dets], dtype=np.float32))
            for image_id, dets in sorted(found.items())
            if not writer.done(image_id)
        ]
        cache_store = store if embedding_cache else None
        with _box_results(
            model_meta["uri"], jobs, workers, use_ray, cache_store, encoder_precision
        ) as results:
            if bad:  # replaced by a rerun of the same detections (same key)
                writer.write_failures(f"detections-{digest[:16]}", bad)
            if jobs:  # the digest is in the rounds table before any image: a kill resumes
                writer.finish(version, {**extra, "images_pending": len(jobs)})
            for result in _bar(results, f"round {round_} boxes", progress, len(jobs)):
                info = result.image
                if result.error is not None:
                    writer.write_failures(
                        info.image_id,
                        [{"image_id": info.image_id, "uri": info.uri, "error": result.error}],
                    )
                    errors.append(result.error)
                    continue
                records = [
                    {
                        **record,
                        "image_id": info.image_id,
                        "index": k,
                        "source": SOURCE,
                        "category_id": detection.category_id,
                        "category": detection.category,
                        "score": detection.score,
                    }
                    for k, (record, detection) in enumerate(
                        zip(result.records, found[info.image_id], strict=True)
                    )
                ]
                writer.write_masks(info.image_id, records, model_version=version)
        figures = stage_figures(store, round_, STAGE)  # once, for metrics and row
        metrics = stage_metrics(figures, STAGE, model_meta, time.perf_counter() - started)
        row = writer.finish(version, {**metrics, **extra, "images_pending": 0}, figures)
    return {**row, "errors": errors}


@contextmanager
def _box_results(
    checkpoint: str | None,
    jobs: list[tuple[ImageInfo, np.ndarray]],
    workers: int,
    use_ray: bool,
    cache_store: Store | None,
    encoder_precision: EncoderPrecision,
) -> Iterator[Iterator[Any]]:
    """The ``ImageResult`` of each job (image, (N, 4) XYXY boxes), in completion order: from
    ``workers`` Ray actors, or one model here; embeddings through ``cache_store``'s cache
    (None: no cache), encoded at ``encoder_precision``. The model is loaded (and a bad
    checkpoint refused) before the caller writes anything."""
    from maskmill.engine.ray_pool import BoxPool, image_result, init_ray

    if not jobs:
        yield iter(())
        return
    if use_ray:
        init_ray()
        with BoxPool(
            checkpoint, workers, cache_store=cache_store, encoder_precision=encoder_precision
        ) as pool:
            yield pool.map(jobs)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(checkpoint, device=device)[0]
    predictor = Predictor(model, encoder_precision)
    cache = open_embedding_cache(cache_store, model)
    yield (
        image_result(
            info,
            partial(box_masks, predictor, boxes=boxes, image_id=info.image_id, cache=cache),
        )
        for info, boxes in jobs
    )

"""COCO import (as ground truth) and COCO / SA-1B export.

Import validates the whole file, and reads every image it names, before it writes anything: a
malformed entry, a missing or unusable image file (decoded whole, with the checks every stage
makes: :func:`~storage.images.read_image_info`) or a mask whose size is not its image's is an
error that names the entry, and the store is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from tqdm import tqdm

from maskmill.storage import rle
from maskmill.storage.catalog import Catalog
from maskmill.storage.errors import (
    BadImageError,
    CocoFormatError,
    GroundTruthConflictError,
    MaskSizeError,
    MissingImageError,
    StorageError,
    ValidationErrors,
)
from maskmill.storage.images import ImageInfo, read_image_info
from maskmill.storage.queries import reviewed_masks
from maskmill.storage.schema import STAGE_GT
from maskmill.storage.store import Store
from maskmill.storage.writer import StageWriter, masks_table, utc_now

GT_ROUND = 0
# Annotation fields exported beside COCO's own when a mask has them (SA-1B's names).
_EXTRA = ("predicted_iou", "stability_score", "point_coords", "crop_box")


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote."""

    images: int
    masks: int
    images_shard: str
    masks_shard: str
    clipped: int  # polygon masks that reached past their image's edge, stored clipped to it


def _entry(kind: str, index: int, item: Any, *names: str) -> str:
    """How an error names a COCO entry: ``annotations[4] (id=12, image_id=3)``."""
    if not isinstance(item, dict):
        return f"{kind}[{index}]"
    fields = ", ".join(f"{n}={item[n]!r}" for n in names if n in item)
    return f"{kind}[{index}] ({fields})" if fields else f"{kind}[{index}]"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _polygon_reach(polygons: list[list[float]], height: int, width: int) -> str | None:
    """Where a COCO polygon's points leave the ``width``x``height`` image (``x -10..20, y
    2..25``), or None when they all lie on it (COCO's pixel edges: 0..width, 0..height)."""
    xs = [v for poly in polygons for v in poly[0::2]]
    ys = [v for poly in polygons for v in poly[1::2]]
    if min(xs) >= 0 and min(ys) >= 0 and max(xs) <= width and max(ys) <= height:
        return None
    return f"x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g}"


def _local_or_url(path: str) -> str:
    """An absolute local path, or the URL as given when it names another filesystem."""
    return path if "://" in path else os.path.abspath(path)


def read_json(url: str, what: str, error: type[ValueError] = ValueError) -> Any:
    """Parse a JSON file (any fsspec URL): the one reader of the JSON files users give
    (annotations, detections). A missing file or invalid JSON raises ``error`` naming the
    file (``what`` says which kind) and the position."""
    try:
        with fsspec.open(url, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        raise error(f"{url}: {what} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as problem:
        where = (
            f" at line {problem.lineno} column {problem.colno}"
            if hasattr(problem, "lineno")
            else ""
        )
        # Some of json's messages end in "at", waiting for the position: "Unterminated string
        # starting at"; the position then reads "... starting at line 1 column 4995".
        msg = getattr(problem, "msg", str(problem)).removesuffix(" at")
        raise error(f"{url}: not valid JSON: {msg}{where}") from None


def load_coco_json(annotations: str) -> dict[str, Any]:
    """Parse a COCO file (any fsspec URL); a top-level shape error is a CocoFormatError."""
    data = read_json(annotations, "annotation file", CocoFormatError)
    if not isinstance(data, dict):
        raise CocoFormatError(f"{annotations}: the top level is not a JSON object")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{annotations}: '{key}' is missing or not a list")
    if not isinstance(data.get("categories", []), list):
        raise CocoFormatError(f"{annotations}: 'categories' is not a list")
    return data


def import_coco(
    annotations: str, images: str, store: Store | str, progress: bool = False
) -> ImportResult:
    """Import a COCO instances file as ground truth (round 0, stage ``gt``, source ``gt``).

    ``annotations``: the COCO JSON file; ``images``: the folder its ``file_name`` values are
    relative to (any fsspec URL). Polygons, uncompressed and compressed RLE and ``iscrowd`` are
    accepted; every mask is stored as pycocotools' compressed RLE. Importing the same file again
    replaces its shards (same images -> same shard key), so counts do not grow.

    A polygon that covers no pixel of its image (wholly outside it, or degenerate) is an error
    of its annotation; one reaching past the image's edge is clipped to it (pycocotools'
    rasterisation) and counted in :attr:`ImportResult.clipped`.
    """
    store = store if isinstance(store, Store) else Store(store)
    data = load_coco_json(annotations)
    errors: list[StorageError] = []

    categories: dict[int, str] = {}
    for i, cat in enumerate(data.get("categories", [])):
        name = _entry("categories", i, cat, "id", "name")
        if (
            not isinstance(cat, dict)
            or not _is_int(cat.get("id"))
            or not isinstance(cat.get("name"), str)
        ):
            errors.append(CocoFormatError(f"{name}: needs an integer 'id' and a string 'name'"))
        elif cat["id"] in categories:
            errors.append(CocoFormatError(f"{name}: duplicate category id {cat['id']}"))
        else:
            categories[cat["id"]] = cat["name"]

    # Images: check the entries, then read every file (size, content hash).
    entries: dict[int, tuple[int, dict[str, Any]]] = {}
    for i, img in enumerate(data["images"]):
        name = _entry("images", i, img, "id", "file_name")
        if (
            not isinstance(img, dict)
            or not _is_int(img.get("id"))
            or not isinstance(img.get("file_name"), str)
            or not img["file_name"]
        ):
            errors.append(CocoFormatError(f"{name}: needs an integer 'id' and a 'file_name'"))
            continue
        for key in ("width", "height"):
            if key in img and not (_is_int(img[key]) and img[key] > 0):
                errors.append(CocoFormatError(f"{name}: '{key}' is not a positive integer"))
        if img["id"] in entries:
            errors.append(CocoFormatError(f"{name}: duplicate image id {img['id']}"))
            continue
        entries[img["id"]] = (i, img)

    root = _local_or_url(images).rstrip("/")
    infos: dict[int, ImageInfo] = {}
    by_sha: dict[str, str] = {}
    for coco_id, (i, img) in tqdm(
        entries.items(), desc="reading images", unit="image", disable=not progress
    ):
        name = _entry("images", i, img, "id", "file_name")
        try:
            info = read_image_info(f"{root}/{img['file_name'].lstrip('/')}")
        except MissingImageError as error:
            errors.append(MissingImageError(error.uri, entry=name))
            continue
        except BadImageError as error:  # the reason every stage would give, at this entry
            errors.append(BadImageError(error.uri, error.reason, error.detail, entry=name))
            continue
        given = (img.get("width", info.width), img.get("height", info.height))
        if given != (info.width, info.height):
            errors.append(
                MaskSizeError(
                    f"{name}: the COCO entry says {given[0]}x{given[1]} (w x h) but the image "
                    f"file is {info.width}x{info.height}"
                )
            )
            continue
        if info.sha256 in by_sha:
            errors.append(
                CocoFormatError(
                    f"{name}: same file content as {by_sha[info.sha256]}; images are identified by "
                    "content, so remove the duplicate entry"
                )
            )
            continue
        by_sha[info.sha256] = name
        infos[coco_id] = info

    # Annotations: structure, references, then the mask itself against its image's size.
    records: list[dict[str, Any]] = []
    clipped = 0
    seen_ids: set[int] = set()
    per_image: dict[int, int] = {}
    for i, ann in enumerate(
        tqdm(data["annotations"], desc="checking masks", unit="mask", disable=not progress)
    ):
        name = _entry("annotations", i, ann, "id", "image_id")
        if not isinstance(ann, dict):
            errors.append(CocoFormatError(f"{name}: not a JSON object"))
            continue
        if not _is_int(ann.get("id")):
            errors.append(CocoFormatError(f"{name}: needs an integer 'id'"))
        elif ann["id"] in seen_ids:
            errors.append(CocoFormatError(f"{name}: duplicate annotation id {ann['id']}"))
        else:
            seen_ids.add(ann["id"])
        if ann.get("image_id") not in entries:
            errors.append(
                CocoFormatError(f"{name}: image_id {ann.get('image_id')!r} is not in 'images'")
            )
            continue
        category_id = ann.get("category_id")
        if categories and category_id not in categories:
            errors.append(
                CocoFormatError(f"{name}: category_id {category_id!r} is not in 'categories'")
            )
            continue
        if ann.get("iscrowd", 0) not in (0, 1):
            errors.append(CocoFormatError(f"{name}: iscrowd {ann.get('iscrowd')!r} is not 0 or 1"))
            continue
        if "segmentation" not in ann:
            errors.append(CocoFormatError(f"{name}: has no 'segmentation'"))
            continue
        info = infos.get(ann["image_id"])
        if info is None:
            continue  # its image already has an error
        try:
            segmentation = rle.from_coco(ann["segmentation"], info.height, info.width)
        except MaskSizeError as error:
            errors.append(MaskSizeError(f"{name}: {error}"))
            continue
        except (ValueError, TypeError) as error:
            errors.append(CocoFormatError(f"{name}: bad segmentation: {error}"))
            continue
        if isinstance(ann["segmentation"], list):  # polygons: points may lie off the image
            reach = _polygon_reach(ann["segmentation"], info.height, info.width)
            if not rle.areas([segmentation])[0]:  # stored, it would be an empty mask
                where = (
                    f"lies wholly outside the {info.width}x{info.height} (w x h) image ({reach})"
                    if reach
                    else "covers no pixel (degenerate)"
                )
                errors.append(CocoFormatError(f"{name}: the polygon {where}: its mask is empty"))
                continue
            if reach:
                clipped += 1
        index = per_image.get(ann["image_id"], 0)
        per_image[ann["image_id"]] = index + 1
        records.append(
            {
                "image_id": info.image_id,
                "index": index,
                "segmentation": segmentation,
                "category_id": category_id,
                "category": categories.get(category_id),
                "iscrowd": bool(ann.get("iscrowd", 0)),
            }
        )

    if errors:
        raise errors[0] if len(errors) == 1 else ValidationErrors(annotations, errors)

    # Everything checked: now write. Same images -> same key -> the shards are replaced.
    ids = sorted(info.image_id for info in infos.values())
    key = "coco-" + hashlib.blake2b("\n".join(ids).encode(), digest_size=8).hexdigest()
    names = {info.image_id: by_sha[info.sha256] for info in infos.values()}
    now = utc_now()
    with StageWriter(store, GT_ROUND, STAGE_GT, owner=f"import-coco {annotations}") as writer:
        _refuse_other_ground_truth(store, key, names)
        images_shard = writer.write_images(key, infos.values(), added_at=now)
        table = masks_table(records, GT_ROUND, STAGE_GT, source="gt", created_at=now)
        masks_shard = writer.write_masks(key, table)
        writer.finish()
    return ImportResult(len(infos), len(records), images_shard, masks_shard, clipped)


def _refuse_other_ground_truth(store: Store, key: str, names: dict[str, str]) -> None:
    """Raise GroundTruthConflictError when an image already has ground truth from another
    import (another shard): its masks would otherwise be stored twice."""
    if not store.shards("masks"):
        return
    own = store.shard_path("masks", key, GT_ROUND, STAGE_GT).rsplit("/", 1)[1]
    with Catalog(store) as catalog:
        rows = catalog.con.execute(
            f"SELECT DISTINCT image_id, filename FROM {catalog.scan('masks')} "
            "WHERE round = ? AND stage = ? AND image_id IN (SELECT unnest(?))",
            [GT_ROUND, STAGE_GT, list(names)],
        ).fetchall()
    errors: list[StorageError] = [
        GroundTruthConflictError(
            f"{names[image_id]}: already has ground truth from another import ({shard}); "
            "delete that shard to import this file instead"
        )
        for image_id, shard in sorted(rows, key=lambda r: names[r[0]])
        if not shard.endswith("/" + own)
    ]
    if errors:
        raise errors[0] if len(errors) == 1 else ValidationErrors("import", errors)


# -- export --------------------------------------------------------------------------------
_EXPORT_COLUMNS = (
    "m.mask_id, m.image_id, m.round, m.stage, m.source, m.segmentation, m.height, m.width, "
    "m.area, m.bbox, m.predicted_iou, m.stability_score, m.point_coords, m.crop_box, "
    "m.category_id, m.category, m.iscrowd, {score}"
)


def _export_rows(
    catalog: Catalog, where: str | None, rule: str, batch: int = 10_000
) -> Iterator[dict]:
    """Mask rows joined with their image, grouped by image, in the order they were written;
    review ``rule`` applies (``storage.queries.reviewed_masks``).

    The shard file and row number keep each image's masks in write order, so an exported file
    imported again gets the same mask indexes (and so the same mask ids).
    """
    if not catalog.store.shards("masks"):
        return
    scan = catalog.scan("masks")
    masks = reviewed_masks(
        f"(SELECT *, filename AS _file, file_row_number AS _row FROM {scan})", rule
    )
    # Shards written before the score column hold none: null, as the masks view reads it.
    score = "m.score" if "score" in catalog.columns("masks") else "NULL::FLOAT AS score"
    query = (
        f"SELECT {_EXPORT_COLUMNS.format(score=score)}, i.uri, "
        "i.width AS image_width, i.height AS image_height "
        f"FROM {masks} m "
        "JOIN images i USING (image_id) "
        + (f"WHERE {where} " if where else "")
        + "ORDER BY i.uri, m.image_id, m.round, m.stage, m._file, m._row"
    )
    reader = catalog.con.sql(query).to_arrow_reader(batch)
    for record_batch in reader:
        yield from record_batch.to_pylist()


def sa1b_annotation(row: dict[str, Any]) -> dict[str, Any]:
    """One mask as an SA-1B annotation dict."""
    return {
        "id": row["mask_id"],
        "segmentation": {"size": [row["height"], row["width"]], "counts": row["segmentation"]},
        "area": row["area"],
        "bbox": list(row["bbox"]),
        "predicted_iou": row["predicted_iou"],
        "point_coords": row["point_coords"],
        "stability_score": row["stability_score"],
        "crop_box": list(row["crop_box"]) if row["crop_box"] is not None else None,
    }


def _file_names(uris: list[str]) -> dict[str, str]:
    """Image file names relative to the folder all images share (COCO's ``file_name``)."""
    if not uris:
        return {}
    paths = [u.split("://", 1)[-1] for u in uris]
    common = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
    if common in paths:  # one image: its folder, not itself
        common = posixpath.dirname(common)
    return {u: posixpath.relpath(p, common) for u, p in zip(uris, paths, strict=True)}


def _score(row: dict[str, Any]) -> float:
    """An exported annotation's ``score``: the mask's own (a detection's), else its predicted
    IoU, else 1.0 (ground truth has neither)."""
    for name in ("score", "predicted_iou"):
        if row[name] is not None:
            return row[name]
    return 1.0


def export_coco(
    store: Store | str,
    out: str,
    where: str | None = None,
    progress: bool = False,
    keep_images_without_masks: bool = True,
    approved_only: bool = False,
) -> dict[str, int]:
    """Write the store's masks (optionally those matching SQL ``where`` over ``masks m``) as a
    COCO instances file that pycocotools loads, streaming annotations.

    Review applies (``storage.queries.reviewed_masks``): rule ``default`` (a round and stage
    with verdicts gives its approved masks, one without gives all, a correction stands in for
    the mask it corrects), or ``approved`` with ``approved_only``.

    Every annotation has ``score``: the stored score of the detection that prompted the mask
    (stage ``boxes``) where there is one, else the predicted IoU, else 1.0 (ground truth), so
    the file also serves as a detection result for ``COCO.loadRes``. Masks
    without a category get the category ``object``. The images list holds every image of the
    store, or with ``keep_images_without_masks`` false only those with an exported mask; an
    image's ``id`` is the same either way (its place among all images), so two exports of a
    store (ground truth, predictions) match.

    Returns ``images`` (listed), ``masks`` and ``images_without_masks`` (images with no
    exported mask, listed or not).
    """
    store = store if isinstance(store, Store) else Store(store)
    rule = "approved" if approved_only else "default"
    masks = reviewed_masks(rule=rule)
    with Catalog(store) as catalog:
        image_rows = catalog.con.execute(
            "SELECT image_id, uri, width, height FROM images ORDER BY uri, image_id"
        ).fetchall()
        with_masks = {
            image_id
            for (image_id,) in catalog.con.execute(
                f"SELECT DISTINCT m.image_id FROM {masks} m JOIN images i USING (image_id) "
                + (f"WHERE {where}" if where else "")
            ).fetchall()
        }
        cats = catalog.con.execute(
            f"SELECT DISTINCT category_id, category FROM {masks} m WHERE category_id IS NOT NULL "
            + (f"AND image_id IN (SELECT image_id FROM {masks} m WHERE {where}) " if where else "")
            + "ORDER BY category_id"
        ).fetchall()
        object_id = max([c for c, _ in cats], default=0) + 1
        names = _file_names([uri for _, uri, _, _ in image_rows])
        image_ids = {image_id: n for n, (image_id, *_rest) in enumerate(image_rows, start=1)}
        images = [
            {
                "id": image_ids[i],
                "file_name": names[u],
                "width": w,
                "height": h,
                "maskmill_image_id": i,
            }
            for i, u, w, h in image_rows
            if keep_images_without_masks or i in with_masks
        ]
        categories = [{"id": c, "name": n or str(c)} for c, n in cats]
        masks = 0
        used_object = False
        with fsspec.open(out, "w") as handle:
            handle.write('{"info": {"description": "maskmill export"}, "licenses": [],\n')
            handle.write(f'"images": {json.dumps(images)},\n"annotations": [\n')
            rows = tqdm(
                _export_rows(catalog, where, rule),
                desc="exporting",
                unit="mask",
                disable=not progress,
            )
            for row in rows:
                category_id = row["category_id"]
                if category_id is None:
                    category_id, used_object = object_id, True
                ann = {
                    "id": masks + 1,
                    "image_id": image_ids[row["image_id"]],
                    "category_id": category_id,
                    "segmentation": {
                        "size": [row["height"], row["width"]],
                        "counts": row["segmentation"],
                    },
                    "area": row["area"],
                    "bbox": list(row["bbox"]),
                    "iscrowd": int(row["iscrowd"]),
                    "score": _score(row),
                    "mask_id": row["mask_id"],
                    "round": row["round"],
                    "stage": row["stage"],
                    "source": row["source"],
                }
                ann.update({k: row[k] for k in _EXTRA if row[k] is not None})
                handle.write((",\n" if masks else "") + json.dumps(ann))
                masks += 1
            if used_object or not categories:
                categories.append({"id": object_id, "name": "object"})
            handle.write(f'\n],\n"categories": {json.dumps(categories)}}}\n')
    return {
        "images": len(images),
        "masks": masks,
        "images_without_masks": len(image_rows) - len(with_masks),
    }


def export_sa1b(
    store: Store | str,
    out: str,
    where: str | None = None,
    progress: bool = False,
    keep_images_without_masks: bool = True,
    approved_only: bool = False,
) -> dict[str, int]:
    """Write one SA-1B JSON file per image into folder ``out`` (any fsspec URL): every image of
    the store, or with ``keep_images_without_masks`` false only those with an exported mask.
    Review applies as in :func:`export_coco` (``approved_only`` likewise).

    Each file is ``{"image": {...}, "annotations": [...]}`` and is named after the image file
    (``sa_1.jpg`` -> ``sa_1.json``; the image id is appended when two images share a name).
    Returns ``images`` (files written), ``masks`` and ``images_without_masks`` (images with no
    exported mask, written or not).
    """
    store = store if isinstance(store, Store) else Store(store)
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    files = masks = 0
    with Catalog(store) as catalog:
        stems = catalog.con.execute(
            "SELECT image_id, regexp_replace(regexp_extract(uri, '[^/]*$'), '\\.[^.]*$', ''), "
            "uri, width, height FROM images"
        ).fetchall()
        stem_count: dict[str, int] = {}
        for _, stem, *_rest in stems:
            stem_count[stem] = stem_count.get(stem, 0) + 1
        names = {i: s if stem_count[s] == 1 else f"{s}-{i}" for i, s, *_rest in stems}
        written: set[str] = set()

        def flush(first: dict[str, Any], anns: list[dict[str, Any]]) -> None:
            doc = {
                "image": {
                    "image_id": first["image_id"],
                    "width": first["image_width"],
                    "height": first["image_height"],
                    "file_name": posixpath.basename(first["uri"]),
                },
                "annotations": anns,
            }
            fs.pipe_file(f"{root}/{names[first['image_id']]}.json", json.dumps(doc).encode())
            written.add(first["image_id"])

        current: dict[str, Any] | None = None
        anns: list[dict[str, Any]] = []
        rows = tqdm(
            _export_rows(catalog, where, "approved" if approved_only else "default"),
            desc="exporting",
            unit="mask",
            disable=not progress,
        )
        for row in rows:
            if current is not None and row["image_id"] != current["image_id"]:
                flush(current, anns)
                files += 1
                anns = []
            if not anns:
                current = row
            anns.append(sa1b_annotation(row))
            masks += 1
        if current is not None:
            flush(current, anns)
            files += 1
        without_masks = len(stems) - files
        if keep_images_without_masks:
            for image_id, _, uri, width, height in stems:
                if image_id not in written:
                    image = {"image_id": image_id, "uri": uri}
                    flush({**image, "image_width": width, "image_height": height}, [])
                    files += 1
    return {"images": files, "masks": masks, "images_without_masks": without_masks}

"""Table schemas, defined once with pyarrow types.

Every shard the storage layer writes is cast to one of these schemas, and the DuckDB catalog
exposes one view per table, so a column has one name and one type everywhere.
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")
BOX = pa.list_(pa.float32(), 4)  # XYWH, fixed size: DuckDB reads it as FLOAT[4]
POINT = pa.list_(pa.float32(), 2)  # XY
CLICK = pa.struct([("x", pa.float32()), ("y", pa.float32()), ("label", pa.int8())])

IMAGES = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("added_at", TIMESTAMP, nullable=False),
    ]
)

MASKS = pa.schema(
    [
        pa.field("mask_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("model_version", pa.int32()),  # N of models/v<N>; null for ground truth
        pa.field("source", pa.string(), nullable=False),  # annotator id, "model" or "gt"
        pa.field("segmentation", pa.string(), nullable=False),  # COCO compressed RLE counts
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("area", pa.int64(), nullable=False),
        pa.field("bbox", BOX, nullable=False),
        pa.field("predicted_iou", pa.float32()),
        pa.field("stability_score", pa.float32()),
        pa.field("point_coords", pa.list_(POINT)),
        pa.field("crop_box", BOX),
        pa.field("clicks", pa.list_(CLICK)),
        pa.field("seconds", pa.float32()),
        # Correction of an annotated mask: brush and eraser strokes, the part of ``seconds``
        # spent on them, and the IoU of the model's mask before any stroke with the mask
        # accepted (how much the person had to fix). Null for model and ground-truth masks.
        pa.field("strokes", pa.int32()),
        pa.field("stroke_seconds", pa.float32()),
        pa.field("model_iou", pa.float32()),
        # Not in the first design: ground truth keeps its class and crowd flag so that a COCO
        # file survives import -> export. Model masks are class-agnostic and leave them null.
        pa.field("category_id", pa.int32()),
        pa.field("category", pa.string()),
        # The score of the detection or concept that prompted the mask (stage ``boxes``: the
        # detector's); null otherwise. Shards written before it read it as null.
        pa.field("score", pa.float32()),
        pa.field("iscrowd", pa.bool_(), nullable=False),
        pa.field("created_at", TIMESTAMP, nullable=False),
    ]
)

ROUNDS = pa.schema(
    [
        pa.field("round", pa.int32(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("model_version", pa.int32()),
        pa.field("started_at", TIMESTAMP),
        pa.field("finished_at", TIMESTAMP, nullable=False),
        pa.field("images", pa.int64(), nullable=False),
        pa.field("masks", pa.int64(), nullable=False),
        pa.field("metrics", pa.string()),  # JSON object of numbers
    ]
)

FAILURES = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("at", TIMESTAMP, nullable=False),
    ]
)

MODELS = pa.schema(
    [
        pa.field("version", pa.int32(), nullable=False),
        pa.field("round", pa.int32()),
        pa.field("uri", pa.string(), nullable=False),  # the model.pt file
        pa.field("config", pa.string()),  # JSON
        pa.field("data_digest", pa.string()),
        pa.field("metrics", pa.string()),  # JSON object of numbers
        pa.field("created_at", TIMESTAMP),
    ]
)

# Review verdicts (mask verification): a row per mask a reviewer judged. A mask is named by the
# masks table's ``mask_id`` (deterministic per image, round, stage and index within the image,
# so unique per stored mask); ``image_id``, ``round`` and ``stage`` repeat the mask's own, so
# "has this round and stage a verdict" needs no join. ``reviewer`` is the reviewer's annotator
# id, in the namespace of the masks' ``source`` (``web:<name>``). A rejected mask may carry the
# reviewer's correction: its RLE counts (the mask's size), area and box, by pycocotools.
REVIEWS = pa.schema(
    [
        pa.field("mask_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reviewer", pa.string(), nullable=False),
        pa.field("verdict", pa.string(), nullable=False),  # one of VERDICTS
        pa.field("reason", pa.string()),
        pa.field("correction", pa.string()),  # COCO compressed RLE counts, or null
        pa.field("correction_area", pa.int64()),
        pa.field("correction_bbox", BOX),
        pa.field("reviewed_at", TIMESTAMP, nullable=False),
        pa.field("seconds", pa.float32()),  # the reviewer's working time on this mask
    ]
)
VERDICTS = ("approved", "rejected")

SCHEMAS: dict[str, pa.Schema] = {
    "images": IMAGES,
    "masks": MASKS,
    "rounds": ROUNDS,
    "failures": FAILURES,
    "models": MODELS,
    "reviews": REVIEWS,
}

# Tables whose shards live under hive partitions round=R/stage=S.
PARTITIONED = {"masks"}

# Columns that repeat a lot within a shard; the rest (ids, RLE counts) are unique per row, where
# a dictionary only costs space.
DICTIONARY_COLUMNS = [
    "image_id",
    "stage",
    "source",
    "category",
    "uri",
    "error",
    "reviewer",
    "verdict",
]

STAGE_GT = "gt"
STAGES = ("gt", "manual", "semi", "auto", "boxes")

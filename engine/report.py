"""The per-round table of a store: what each round made, at what cost, with which model."""

from __future__ import annotations

from typing import Any

from maskmill.storage import Store
from maskmill.storage.queries import learning_curves

# (key in the row, column title, format): the learning curves (``storage.queries.
# learning_curves``) with the round's own metrics.
COLUMNS: list[tuple[str, str, str]] = [
    ("round", "round", "{}"),
    ("stage", "stage", "{}"),
    ("model_version", "model", "v{}"),
    ("images", "images", "{}"),
    ("masks", "masks", "{}"),
    ("masks_per_image", "masks/image", "{:.1f}"),
    ("seconds_per_mask", "s/mask", "{:.1f}"),
    ("clicks_per_mask", "clicks/mask", "{:.2f}"),
    ("strokes_per_mask", "strokes/mask", "{:.2f}"),
    ("model_iou", "model IoU", "{:.3f}"),
    ("failures", "failures", "{}"),
    ("used_miou", "mIoU used", "{:.3f}"),
    ("used_noc90", "NoC@90 used", "{:.1f}"),
    ("produced", "produced", "{}"),
    ("produced_miou", "mIoU produced", "{:.3f}"),
]


def rounds_table(store: Store | str) -> list[dict[str, Any]]:
    """One dict per finished round and stage (ground truth left out): the learning curves
    (annotation cost per mask, model IoU before correction, held-out quality of the model the
    round used and of the one it produced) with the round's metrics merged in; ``images`` is
    the images the stage finished (``storage.queries.images_done``)."""
    out = []
    for record in learning_curves(store):
        metrics = record.pop("metrics")
        row = {**{k: v for k, v in metrics.items() if v is not None}, **record}
        if record["produced_version"] is not None:
            verdict = {True: "", False: " rejected"}.get(record["produced_promoted"], "")
            row["produced"] = f"v{record['produced_version']}{verdict}"
        out.append(row)
    return out


def auto_stage_warning(rows: list[dict[str, Any]]) -> str | None:
    """What to say when the newest automatic round of a rounds table (:func:`rounds_table`)
    kept fewer masks than images (under one per image: the model, or its thresholds, do not
    suit these images), with what to do about it; None when it kept enough or there is none."""
    auto = [row for row in rows if row.get("stage") == "auto" and row.get("images")]
    if not auto:
        return None
    row = auto[-1]
    masks, images = int(row.get("masks") or 0), int(row["images"])
    if masks >= images:
        return None
    version = row.get("model_version")
    model = f"model v{version}" if version is not None else "the model"
    at = ""
    if row.get("pred_iou_thresh") is not None and row.get("stability_score_thresh") is not None:
        at = (
            f" at predicted IoU >= {row['pred_iou_thresh']:g} and stability >= "
            f"{row['stability_score_thresh']:g}"
        )
    return (
        f"the automatic stage (round {row['round']}) kept {masks} mask(s) on {images} images "
        f"({masks / images:.2f} per image) with {model}{at}: it does not see these images' "
        "objects well. To keep more: start from a stronger model (--checkpoint, e.g. an "
        "official SAM file), lower --pred-iou-thresh / --stability-score-thresh, or annotate "
        "some of the images first (--annotations with --manual-rounds, or maskmill serve) so "
        "retraining adapts the model to them."
    )


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def format_rounds(rows: list[dict[str, Any]]) -> str:
    """The table as aligned text for a terminal."""
    header = [title for _, title, _ in COLUMNS]
    body = [[_cell(r, key, fmt) for key, _, fmt in COLUMNS] for r in rows]
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def markdown_rounds(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (the Prefect artifact)."""
    header = [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(r, key, fmt) for key, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)

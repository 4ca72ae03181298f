"""The per-round table of a store: what each round made, at what cost, with which model."""

from __future__ import annotations

from typing import Any

from maskmill.storage import Store
from maskmill.storage.queries import rounds_rows

# (key in the rounds row or its metrics, column title, format)
COLUMNS: list[tuple[str, str, str]] = [
    ("round", "round", "{}"),
    ("stage", "stage", "{}"),
    ("model_version", "model", "v{}"),
    ("images", "images", "{}"),
    ("masks", "masks", "{}"),
    ("masks_per_image", "masks/image", "{:.1f}"),
    ("clicks_per_mask", "clicks/mask", "{:.2f}"),
    ("seconds", "seconds", "{:.0f}"),
    ("failures", "failures", "{}"),
    ("heldout_miou", "held-out 1-click mIoU", "{:.3f}"),
]


def rounds_table(store: Store | str) -> list[dict[str, Any]]:
    """One dict per round and stage of the rounds table (ground truth and ingest left out),
    with the round's metrics merged in; ``images`` is the images the stage finished
    (``storage.queries.images_done``)."""
    out = []
    for record in rounds_rows(store):
        metrics = record.pop("metrics")
        out.append({**record, **{k: v for k, v in metrics.items() if v is not None}})
    return out


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

"""Figures of a store like the SA-1B paper's, drawn with matplotlib's Agg canvas (no display).

Each figure's numbers come from DuckDB SQL over the catalog; matplotlib only draws them.
``Figure`` objects are used directly, not pyplot, so nothing global is changed in the caller.
"""

from __future__ import annotations

import io
import math

import fsspec
import numpy as np
from matplotlib.figure import Figure

from maskmill.storage.catalog import Catalog
from maskmill.storage.stats import score_bucket_sql

SIZE_BINS = 25  # relative mask size histogram over [0, 1]
CENTRE_BINS = 40  # mask-centre heat map, per axis
MAX_PANELS = 6  # heat maps drawn for at most this many round/stage groups (largest first)
DPI = 120


def _label(round_: int, stage: str) -> str:
    return f"round {round_} {stage}"


def _save(fig: Figure, out_dir: str, name: str) -> str:
    """Write a figure as PNG into ``out_dir`` (any fsspec URL); return the file's path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    path = f"{out_dir.rstrip('/')}/{name}"
    with fsspec.open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def _legend(ax, series: int) -> None:
    """Legend inside the axes for a few series, outside on the right for many."""
    if series > 3:
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend(frameon=False, fontsize=9)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_masks_per_image(catalog: Catalog, out_dir: str) -> str:
    """Histogram of masks per image, percent of images, one series per round and stage."""
    rows = catalog.con.execute(
        "SELECT round, stage, count(*) FROM masks GROUP BY round, stage, image_id"
    ).fetchall()
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    if not rows:
        _empty(ax, "no masks")
        return _save(fig, out_dir, "masks_per_image.png")
    groups: dict[tuple, list[int]] = {}
    for round_, stage, n in rows:
        groups.setdefault((round_, stage), []).append(n)
    top = max(n for *_, n in rows)
    # Integer-aligned bins, at most ~25 of them: every bar covers the same count of values.
    step = max(1, math.ceil((top + 1) / 25))
    edges = np.arange(0.5, top + step + 0.5, step)
    centres = (edges[:-1] + edges[1:]) / 2
    width = step / (len(groups) + 0.5)
    for k, (key, counts) in enumerate(sorted(groups.items())):
        percent = 100 * np.histogram(counts, edges)[0] / len(counts)
        label = f"{_label(*key)} ({len(counts)} images)"
        if len(groups) <= 2:  # bars side by side read well for one or two series
            offset = (k - (len(groups) - 1) / 2) * width
            ax.bar(centres + offset, percent, width=width, label=label)
        else:  # more series: lines, like the SA-1B paper's dataset comparisons
            ax.plot(centres, percent, marker="o", markersize=3, label=label)
    ax.set_xlabel("masks per image" + (f" (bins of {step})" if step > 1 else ""))
    ax.set_ylabel("percent of images")
    ax.set_title("Masks per image")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(bottom=0)
    _legend(ax, len(groups))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_dir, "masks_per_image.png")


def plot_relative_size(catalog: Catalog, out_dir: str) -> str:
    """Distribution of sqrt(mask area / image area), percent of masks, per round and stage."""
    rows = catalog.con.execute(
        f"""SELECT round, stage,
                   least(floor(sqrt(area / (height * width)) * {SIZE_BINS}), {SIZE_BINS - 1})::INT,
                   count(*)
            FROM masks GROUP BY ALL"""
    ).fetchall()
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    if not rows:
        _empty(ax, "no masks")
        return _save(fig, out_dir, "relative_mask_size.png")
    groups: dict[tuple, np.ndarray] = {}
    for round_, stage, b, n in rows:
        groups.setdefault((round_, stage), np.zeros(SIZE_BINS))[b] += n
    centres = (np.arange(SIZE_BINS) + 0.5) / SIZE_BINS
    for key, hist in sorted(groups.items()):
        ax.plot(
            centres,
            100 * hist / hist.sum(),
            marker="o",
            markersize=3,
            label=f"{_label(*key)} ({int(hist.sum())} masks)",
        )
    ax.set_xlabel("relative mask size  sqrt(mask area / image area)")
    ax.set_ylabel("percent of masks")
    ax.set_title("Relative mask size")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    _legend(ax, len(groups))
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, "relative_mask_size.png")


def plot_centres(catalog: Catalog, out_dir: str) -> str:
    """Heat map of mask centres (bounding-box centres, in image-relative coordinates).

    The grid is coarser for small stores (about 3 masks per cell on average, 8 to 40 cells a
    side), so a few hundred masks give a readable map rather than scattered single pixels.
    """
    total = catalog.con.execute("SELECT count(*) FROM masks").fetchone()[0]
    b = int(np.clip(math.sqrt(total / 3), 8, CENTRE_BINS))
    rows = catalog.con.execute(
        f"""SELECT round, stage,
                   least(floor((bbox[1] + bbox[3] / 2) / width * {b}), {b - 1})::INT AS x,
                   least(floor((bbox[2] + bbox[4] / 2) / height * {b}), {b - 1})::INT AS y,
                   count(*)
            FROM masks GROUP BY ALL"""
    ).fetchall()
    groups: dict[tuple, np.ndarray] = {}
    for round_, stage, x, y, n in rows:
        groups.setdefault((round_, stage), np.zeros((b, b)))[y, x] += n
    shown = sorted(groups.items(), key=lambda kv: -kv[1].sum())[:MAX_PANELS]
    cols = max(1, min(3, len(shown)))
    nrows = max(1, math.ceil(len(shown) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.7 * nrows + 0.3), layout="constrained")
    if not shown:
        _empty(fig.add_subplot(), "no masks")
        return _save(fig, out_dir, "mask_centres.png")
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.ravel()[len(shown) :]:
        ax.set_visible(False)
    for ax, (key, grid) in zip(axes.ravel(), shown, strict=False):
        image = ax.imshow(
            100 * grid / grid.sum(), extent=(0, 1, 1, 0), cmap="magma", interpolation="nearest"
        )
        ax.set_title(f"{_label(*key)}: {int(grid.sum())} masks", fontsize=10)
        ax.set_xlabel("x / width")
        ax.set_ylabel("y / height")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="percent of masks")
    fig.suptitle(f"Mask centres ({b}x{b} cells)")
    return _save(fig, out_dir, "mask_centres.png")


def plot_scores(catalog: Catalog, out_dir: str) -> str:
    """Predicted IoU and stability score histograms per round and stage (model masks)."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, column in zip(axes, ("predicted_iou", "stability_score"), strict=True):
        rows = catalog.con.execute(
            f"""SELECT round, stage, {score_bucket_sql(column, 20)}, count(*)
                FROM masks WHERE {column} IS NOT NULL GROUP BY ALL"""
        ).fetchall()
        title = column.replace("_", " ")
        if not rows:
            _empty(ax, f"no {title} stored\n(ground truth has none)")
            ax.set_title(title)
            continue
        groups: dict[tuple, np.ndarray] = {}
        for round_, stage, b, n in rows:
            groups.setdefault((round_, stage), np.zeros(20))[b] += n
        for key, hist in sorted(groups.items()):
            ax.stairs(
                100 * hist / hist.sum(),
                np.linspace(0, 1, 21),
                linewidth=1.5,
                label=f"{_label(*key)} ({int(hist.sum())})",
            )
        ax.set_xlim(0, 1)
        ax.set_xlabel(title)
        ax.set_ylabel("percent of masks")
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out_dir, "scores.png")


# The learning-curve panels: (title, y label, [(row key, series label, line style)]).
_CURVES = [
    ("Seconds per mask", "seconds", [("seconds_per_mask", "annotation time", "-")]),
    (
        "Clicks and strokes per mask",
        "per mask",
        [("clicks_per_mask", "clicks", "-"), ("strokes_per_mask", "strokes", "--")],
    ),
    ("Model IoU before correction", "IoU", [("model_iou", "model mask vs accepted", "-")]),
    ("Masks per image", "masks", [("masks_per_image", "masks per image", "-")]),
    (
        "Held-out 1-click mIoU",
        "mIoU",
        [("used_miou", "model the round used", "-"), ("produced_miou", "model it produced", "--")],
    ),
    (
        "Held-out NoC@90",
        "clicks",
        [
            ("used_noc90", "model the round used", "-"),
            ("produced_noc90", "model it produced", "--"),
        ],
    ),
]
_STAGE_MARKERS = {"manual": "o", "semi": "s", "auto": "^", "boxes": "D"}


def plot_learning_curves(catalog: Catalog, out_dir: str) -> str:
    """The data engine's learning curves, one panel per figure of
    ``storage.queries.learning_curves``: annotation cost per mask, how much of the model's mask
    was kept, masks per image and the held-out quality of the model each round used and
    produced. x: round; markers: the round's stage."""
    from maskmill.storage.queries import learning_curves

    rows = learning_curves(catalog)
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    rounds = [int(r["round"]) for r in rows]
    for ax, (title, ylabel, series) in zip(axes, _CURVES, strict=True):
        ax.set_title(title)
        drawn = False
        for colour, (key, label, style) in enumerate(series):
            points = [(int(r["round"]), r[key], r["stage"]) for r in rows if r.get(key) is not None]
            if not points:
                continue
            drawn = True
            ax.plot(
                [x for x, _, _ in points],
                [y for _, y, _ in points],
                style,
                color=f"C{colour}",
                label=label,
            )
            for row in rows:
                if row.get(key) is None:
                    continue
                # A produced model that was not promoted: a hollow marker.
                rejected = key.startswith("produced") and row.get("produced_promoted") is False
                ax.scatter(
                    [int(row["round"])],
                    [row[key]],
                    marker=_STAGE_MARKERS.get(row["stage"], "o"),
                    facecolor="white" if rejected else f"C{colour}",
                    edgecolor=f"C{colour}",
                    zorder=3,
                )
        if not drawn:
            _empty(ax, "no data yet")
            continue
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted(set(rounds)))
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
        ax.set_ylim(0, 1.02 if "IoU" in title else None)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(frameon=False, fontsize=8)
    stages = sorted({r["stage"] for r in rows}, key=list(_STAGE_MARKERS).index)
    handles = [
        axes[0].scatter([], [], color="0.3", marker=_STAGE_MARKERS[s], label=s) for s in stages
    ]
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=len(handles),
            frameon=False,
            title="stage of the round (hollow: a produced model that was not promoted)",
        )
    return _save(fig, out_dir, "learning_curves.png")


def plot_stats(catalog: Catalog, out_dir: str) -> list[str]:
    """Draw every figure into ``out_dir`` (created if needed); return the PNG paths."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    return [
        plot(catalog, out_dir)
        for plot in (
            plot_masks_per_image,
            plot_relative_size,
            plot_centres,
            plot_scores,
            plot_learning_curves,
        )
    ]

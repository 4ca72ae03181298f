"""Statistics of a store, computed by DuckDB SQL over the Parquet shards.

Every figure comes per round and stage and overall (``GROUPING SETS``), in one scan per
question: masks per image, relative mask size buckets, predicted-IoU and stability histograms,
failures, and the rounds table's model metrics. Per person (each ``source`` of a person's
masks): images, masks, seconds, clicks and strokes per mask, and review acceptance; and the
review verdicts per round and stage. The embedding cache's size (entries, bytes, encoders) comes
from a listing of its files (``storage.embeddings.cache_size``), not from SQL.
"""

from __future__ import annotations

import json
import math
from typing import Any

from maskmill.storage.catalog import Catalog
from maskmill.storage.embeddings import cache_size
from maskmill.storage.queries import LATEST_VERDICTS, REVIEWABLE

# Relative mask size as in the SA-1B paper: sqrt(mask area / image area).
SIZE_EDGES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
SCORE_BINS = 10  # predicted IoU and stability histograms: 10 bins over [0, 1]
TOP_ERRORS = 5


def size_bucket_sql(column: str = "sqrt(area / (height * width))") -> str:
    """SQL CASE giving the SIZE_EDGES bucket (0-based) of a relative size expression."""
    whens = " ".join(f"WHEN {column} < {edge} THEN {i}" for i, edge in enumerate(SIZE_EDGES[1:-1]))
    return f"CASE {whens} ELSE {len(SIZE_EDGES) - 2} END"


def score_bucket_sql(column: str, bins: int = SCORE_BINS) -> str:
    """SQL bin (0-based, ``bins`` over [0, 1], outliers clamped) of a score; NULL stays NULL
    (DuckDB's greatest/least skip NULLs, so the CASE keeps unscored masks out)."""
    # + 1e-6: scores are float32, and 0.9 stored is 0.89999998; it belongs to the 0.9-1.0 bin
    scaled = f"floor({column}::DOUBLE * {bins} + 1e-6)"
    clamped = f"least(greatest({scaled}, 0), {bins - 1})::INTEGER"
    return f"CASE WHEN {column} IS NOT NULL THEN {clamped} END"


def _boundaries_sql(uppers: list[float]) -> str:
    """A DOUBLE[] literal of histogram boundaries (each written so it parses back exactly),
    closed by infinity: ``histogram(x, boundaries)`` counts x into the first boundary >= x."""
    values = ", ".join(f"'{value!r}'::DOUBLE" for value in uppers)
    return f"[{values}, 'infinity'::DOUBLE]"


def size_boundaries_sql() -> str:
    """Boundaries giving :func:`size_bucket_sql`'s buckets in DuckDB's ``histogram(x,
    boundaries)``, several times faster on millions of rows than ``histogram`` of a CASE: it
    counts x <= boundary where the CASE has x < edge, so each edge moves one ulp down."""
    return _boundaries_sql([math.nextafter(edge, -math.inf) for edge in SIZE_EDGES[1:-1]])


def score_boundaries_sql(bins: int = SCORE_BINS) -> str:
    """Boundaries giving :func:`score_bucket_sql`'s bins in ``histogram(x::DOUBLE,
    boundaries)``: bin k holds floor(x * bins + 1e-6) = k, i.e. x < (k + 1 - 1e-6) / bins;
    below 0 falls in the first bin, above 1 in the last, NULL in none."""
    return _boundaries_sql(
        [math.nextafter((k + 1 - 1e-6) / bins, -math.inf) for k in range(bins - 1)]
    )


def _binned(histogram: dict[float, int] | None) -> dict[int, int]:
    """A boundaries histogram (boundary -> count) as bin index -> count."""
    return {i: int(n) for i, (_, n) in enumerate(sorted((histogram or {}).items()))}


def _summed(rows: list[tuple]) -> tuple:
    """Column-wise sums of rows of histograms (dicts, added key by key) and counts."""
    totals: list[Any] = []
    for column in zip(*rows, strict=True):
        if isinstance(column[0], dict) or column[0] is None:
            total: dict[Any, int] = {}
            for histogram in column:
                for key, n in (histogram or {}).items():
                    total[key] = total.get(key, 0) + int(n)
            totals.append(total)
        else:
            totals.append(sum(int(n) for n in column))
    return tuple(totals)


def _counts(histogram: dict[int, int] | None, bins: int) -> list[int]:
    histogram = histogram or {}
    return [int(histogram.get(i, 0)) for i in range(bins)]


def compute_stats(catalog: Catalog) -> dict[str, Any]:
    """All statistics of the store behind ``catalog``, as a JSON-ready dict.

    Masks per image are over the images that have at least one mask in the group; ``images`` is
    the images table's count (images registered, with or without masks).
    """
    con = catalog.con
    score_edges = [i / SCORE_BINS for i in range(SCORE_BINS + 1)]

    per_image = con.execute(
        """
        WITH per_image AS (
            SELECT round, stage, image_id, count(*) AS n, GROUPING(round) AS overall
            FROM masks GROUP BY GROUPING SETS ((round, stage, image_id), (image_id)))
        SELECT overall, round, stage, count(*) AS images, sum(n) AS masks, avg(n) AS mean,
               median(n) AS median, quantile_cont(n, 0.9) AS p90
        FROM per_image GROUP BY overall, round, stage
        """
    ).fetchall()
    # Per round and stage only: the overall histograms are their sums (added up below), which
    # spares a second aggregation of every row (10 M masks: ~0.6 s instead of ~3.7 s).
    scores = score_boundaries_sql()
    by_group = con.execute(
        f"""
        SELECT round, stage,
               histogram(sqrt(area / (height * width)), {size_boundaries_sql()}) AS size,
               histogram(predicted_iou::DOUBLE, {scores}) AS iou,
               histogram(stability_score::DOUBLE, {scores}) AS stability,
               count(predicted_iou) AS with_iou, count(stability_score) AS with_stability,
               histogram(source) AS sources
        FROM masks GROUP BY round, stage
        """
    ).fetchall()
    hist = [
        (0, round_, stage, _binned(size), _binned(iou), _binned(stab), *rest)
        for round_, stage, size, iou, stab, *rest in by_group
    ]
    if by_group:
        hist.append((1, None, None, *_summed([row[3:] for row in hist])))

    groups: dict[tuple, dict[str, Any]] = {}
    for overall, round_, stage, images, masks, mean, median, p90 in per_image:
        key = None if overall else (round_, stage)
        groups[key] = {
            "round": round_,
            "stage": stage,
            "images": int(images),
            "masks": int(masks),
            "masks_per_image": {"mean": mean, "median": median, "p90": p90},
        }
    for overall, round_, stage, size, iou, stab, with_iou, with_stab, sources in hist:
        group = groups.get(None if overall else (round_, stage))
        if group is None:  # the () grouping set of an empty masks table
            continue
        group["relative_size"] = {
            "edges": list(SIZE_EDGES),
            "counts": _counts(size, len(SIZE_EDGES) - 1),
        }
        group["predicted_iou"] = {
            "edges": score_edges,
            "counts": _counts(iou, SCORE_BINS),
            "masks_without": group["masks"] - int(with_iou),
        }
        group["stability_score"] = {
            "edges": score_edges,
            "counts": _counts(stab, SCORE_BINS),
            "masks_without": group["masks"] - int(with_stab),
        }
        group["sources"] = {k: int(v) for k, v in sorted((sources or {}).items())}

    empty = {
        "images": 0,
        "masks": 0,
        "masks_per_image": {"mean": None, "median": None, "p90": None},
        "relative_size": {"edges": list(SIZE_EDGES), "counts": [0] * (len(SIZE_EDGES) - 1)},
        "predicted_iou": {"edges": score_edges, "counts": [0] * SCORE_BINS, "masks_without": 0},
        "stability_score": {"edges": score_edges, "counts": [0] * SCORE_BINS, "masks_without": 0},
        "sources": {},
    }
    total = groups.pop(None, empty)

    failures_by_group = con.execute(
        "SELECT round, stage, count(*) FROM failures GROUP BY round, stage ORDER BY round, stage"
    ).fetchall()
    top_errors = con.execute(
        f"""SELECT split_part(error, chr(10), 1) AS error, count(*) AS n FROM failures
            GROUP BY 1 ORDER BY n DESC, error LIMIT {TOP_ERRORS}"""
    ).fetchall()
    rounds = con.execute(
        "SELECT round, stage, model_version, images, masks, metrics FROM rounds "
        "ORDER BY round, stage"
    ).fetchall()
    # Acceptance: approved / reviewed, over each mask's standing (newest) verdict; a corrected
    # mask was rejected (the reviewer had to fix it).
    columns, annotators = catalog.query(
        f"""SELECT m.source AS annotator, count(DISTINCT m.image_id) AS images, count(*) AS masks,
                   avg(m.seconds) AS seconds_per_mask,
                   avg(coalesce(len(m.clicks), 0)) AS clicks_per_mask,
                   avg(coalesce(m.strokes, 0)) AS strokes_per_mask,
                   count(v.mask_id) AS reviewed,
                   count(*) FILTER (WHERE v.verdict = 'approved') AS approved,
                   count(*) FILTER (WHERE v.verdict = 'approved') / nullif(count(v.mask_id), 0)
                       AS acceptance_rate
            FROM masks m LEFT JOIN {LATEST_VERDICTS} v ON v.mask_id = m.mask_id
            WHERE {REVIEWABLE} GROUP BY m.source ORDER BY m.source"""
    )
    review_columns, review_rows = catalog.query(
        f"""SELECT GROUPING(round) AS overall, round, stage, count(*) AS reviewed,
                   count(*) FILTER (WHERE verdict = 'approved') AS approved,
                   count(*) FILTER (WHERE verdict = 'rejected') AS rejected,
                   count(correction) AS corrected,
                   count(*) FILTER (WHERE verdict = 'approved') / nullif(count(*), 0)
                       AS acceptance_rate
            FROM {LATEST_VERDICTS} v GROUP BY GROUPING SETS ((round, stage), ())
            ORDER BY overall DESC, round, stage"""
    )
    review_groups = [dict(zip(review_columns, row, strict=True)) for row in review_rows]
    for group in review_groups:
        del group["overall"]
    review_total = review_groups.pop(0) if review_groups and review_rows[0][0] else None
    reviewers, verdicts = con.execute(
        "SELECT count(DISTINCT reviewer), count(*) FROM reviews"
    ).fetchone()
    cache = cache_size(catalog.store)

    return {
        "store": catalog.store.url,
        "images": int(con.execute("SELECT count(*) FROM images").fetchone()[0]),
        "images_with_masks": total["images"],
        "masks": total["masks"],
        "masks_per_image": total["masks_per_image"],
        "relative_size": total["relative_size"],
        "predicted_iou": total["predicted_iou"],
        "stability_score": total["stability_score"],
        "sources": total["sources"],
        "groups": [groups[k] for k in sorted(groups)],
        "failures": {
            "total": sum(n for *_, n in failures_by_group),
            "groups": [{"round": r, "stage": s, "failures": n} for r, s, n in failures_by_group],
            "top_errors": [{"error": e, "count": n} for e, n in top_errors],
        },
        "rounds": [
            {
                "round": r,
                "stage": s,
                "model_version": v,
                "images": i,
                "masks": m,
                "metrics": json.loads(metrics) if metrics else {},
            }
            for r, s, v, i, m, metrics in rounds
        ],
        "models": int(con.execute("SELECT count(*) FROM models").fetchone()[0]),
        "annotators": [dict(zip(columns, row, strict=True)) for row in annotators],
        "reviews": {
            "verdicts": int(verdicts),
            "reviewers": int(reviewers),
            "masks_reviewed": review_total["reviewed"] if review_total else 0,
            "approved": review_total["approved"] if review_total else 0,
            "rejected": review_total["rejected"] if review_total else 0,
            "corrected": review_total["corrected"] if review_total else 0,
            "acceptance_rate": review_total["acceptance_rate"] if review_total else None,
            "groups": review_groups,
        },
        "embedding_cache": {
            "entries": cache.entries,
            "bytes": cache.bytes,
            "encoders": cache.encoders,
        },
    }


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bar(counts: list[int], width: int = 30) -> list[str]:
    top = max(counts) or 1
    return ["#" * round(width * c / top) for c in counts]


def format_stats(stats: dict[str, Any]) -> str:
    """The statistics as text for a terminal."""
    lines = [
        f"store    {stats['store']}",
        f"images   {stats['images']}  ({stats['images_with_masks']} with masks)",
        f"masks    {stats['masks']}",
        "masks per image  mean {}  median {}  p90 {}".format(
            *(_num(stats["masks_per_image"][k]) for k in ("mean", "median", "p90"))
        ),
        "",
        "round  stage   images    masks  per image: mean  median    p90  sources",
    ]
    for g in stats["groups"]:
        mpi = g["masks_per_image"]
        sources = ", ".join(f"{k} {v}" for k, v in g["sources"].items())
        lines.append(
            f"{g['round']:>5}  {g['stage']:<6} {g['images']:>7} {g['masks']:>8}"
            f"  {_num(mpi['mean']):>15} {_num(mpi['median']):>7} {_num(mpi['p90']):>6}"
            f"  {sources}"
        )
    rel = stats["relative_size"]
    lines += ["", "relative mask size sqrt(area / image area), all masks"]
    for lo, hi, count, bar in zip(
        rel["edges"][:-1], rel["edges"][1:], rel["counts"], _bar(rel["counts"]), strict=True
    ):
        lines.append(f"  {lo:4.2f}-{hi:4.2f} {count:>9}  {bar}")
    for name in ("predicted_iou", "stability_score"):
        hist = stats[name]
        scored = sum(hist["counts"])
        lines += [
            "",
            f"{name.replace('_', ' ')}: {scored} masks scored, {hist['masks_without']} without",
        ]
        if scored:
            for lo, count, bar in zip(
                hist["edges"], hist["counts"], _bar(hist["counts"]), strict=False
            ):
                lines.append(f"  {lo:3.1f}-{lo + 0.1:3.1f} {count:>9}  {bar}")
    failures = stats["failures"]
    lines += ["", f"failures {failures['total']}"]
    lines += [f"  round {f['round']} {f['stage']}: {f['failures']}" for f in failures["groups"]]
    lines += [f"  {e['count']:>6} x {e['error'][:90]}" for e in failures["top_errors"]]
    if stats["rounds"]:
        lines += ["", "rounds (finished stages)"]
        for r in stats["rounds"]:
            metrics = ", ".join(
                f"{k} {v:.4g}" for k, v in r["metrics"].items() if isinstance(v, (int, float))
            )
            model = "-" if r["model_version"] is None else f"v{r['model_version']}"
            lines.append(
                f"  round {r['round']} {r['stage']:<6} model {model}  "
                f"{r['images']} images  {r['masks']} masks  {metrics}"
            )
    lines.append(f"models   {stats['models']}")
    cache = stats.get("embedding_cache")
    if cache is not None:
        lines.append(
            f"embedding cache  {cache['entries']} embeddings, {_size(cache['bytes'])} "
            f"({cache['encoders']} image encoder{'' if cache['encoders'] == 1 else 's'})"
        )
    if stats["annotators"]:
        lines += [
            "",
            "annotators (a person's masks, every round and stage; acceptance: approved / reviewed)",
            f"{'annotator':<20} {'images':>6} {'masks':>6} {'s/mask':>7} {'clicks/mask':>11} "
            f"{'strokes/mask':>12} {'reviewed':>8} {'accepted':>8}",
        ]
        for a in stats["annotators"]:
            lines.append(
                f"{a['annotator']:<20} {a['images']:>6} {a['masks']:>6} "
                f"{_num(a['seconds_per_mask']):>7} {_num(a['clicks_per_mask'], 2):>11} "
                f"{_num(a['strokes_per_mask'], 2):>12} {a['reviewed']:>8} "
                f"{_percent(a['acceptance_rate']):>8}"
            )
    reviews = stats["reviews"]
    if reviews["verdicts"]:
        lines += [
            "",
            f"reviews  {reviews['verdicts']} verdicts by {reviews['reviewers']} reviewer(s); "
            f"per mask, its newest: {_review_line(reviews, 'masks_reviewed')}",
        ]
        for g in reviews["groups"]:
            lines.append(f"  round {g['round']} {g['stage']:<6} {_review_line(g, 'reviewed')}")
    return "\n".join(lines)


def _size(n_bytes: int) -> str:
    """Bytes for people: ``512 B``, ``1.5 MB``, ``2.0 GB`` (powers of 1024)."""
    size, unit = float(n_bytes), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            break
        size /= 1024
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f} %"


def _review_line(figures: dict[str, Any], reviewed: str) -> str:
    return (
        f"{figures[reviewed]} reviewed, {figures['approved']} approved, "
        f"{figures['rejected']} rejected ({figures['corrected']} corrected), "
        f"acceptance {_percent(figures['acceptance_rate'])}"
    )

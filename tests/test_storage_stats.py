"""Statistics against hand-computed numbers, plots, and the storage CLI commands."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from maskmill.flows.cli import main
from maskmill.storage import Catalog, StageWriter, Store, compute_stats, format_stats, rle
from maskmill.storage.images import ImageInfo, images_table
from maskmill.storage.plots import plot_stats
from maskmill.storage.writer import utc_now
from tests.test_storage_data import STORE_KINDS, empty_store, make_coco


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path) -> Iterator[Store]:
    yield from empty_store(request.param, tmp_path)


def _square(side: int, iou: float | None, stability: float | None, image: str) -> dict:
    """A side x side square mask on a 100 x 100 image: relative size side / 100."""
    mask = np.zeros((100, 100), bool)
    mask[10 : 10 + side, 5 : 5 + side] = True
    return {
        "image_id": image,
        "segmentation": rle.encode(mask),
        "predicted_iou": iou,
        "stability_score": stability,
    }


def _fill(store: Store) -> None:
    """Round 1 auto: A 3 masks, B 1, C 6; round 2 semi: A 2 (annotated, unscored)."""
    infos = [
        ImageInfo(image_id=i, uri=f"file:///{i}.png", height=100, width=100, sha256=i * 4)
        for i in ("A", "B", "C", "D")
    ]
    store.write_shard("images", images_table(infos, utc_now()), "test")
    auto = (
        [_square(s, q, t, "A") for s, q, t in [(3, 0.95, 0.99), (7, 0.85, 0.91), (20, 0.05, 0.5)]]
        + [_square(40, 1.02, 0.97, "B")]
        + [_square(s, 0.9, 0.96, "C") for s in (60, 90, 3, 3, 7, 20)]
    )
    with StageWriter(store, 1, "auto") as writer:
        writer.write_masks("part-a", auto[:4], model_version=1)
        writer.write_masks("part-b", auto[4:], model_version=1)
        writer.write_failures(
            "part-a",
            [
                {"image_id": "E", "error": "CUDA out of memory\nTraceback ..."},
                {"uri": "file:///F.png", "error": "CUDA out of memory\nTraceback ..."},
            ],
        )
        writer.finish(model_version=1, metrics={"miou": 0.7, "ap": 0.5})
    semi = [
        {
            **_square(s, None, None, "A"),
            "source": "annotator-1",
            "clicks": [[12, 14, 1], [50, 50, 0]],
            "seconds": 4.5,
        }
        for s in (20, 40)
    ]
    with StageWriter(store, 2, "semi") as writer:
        writer.write_masks("part-a", semi, model_version=1)
        writer.write_failures("part-a", [{"image_id": "G", "error": "image unreadable"}])
        writer.finish(model_version=2, metrics={"miou": 0.8})


def test_stats_match_known_numbers(store):
    _fill(store)
    with Catalog(store) as catalog:
        stats = compute_stats(catalog)
    assert (stats["images"], stats["images_with_masks"], stats["masks"]) == (4, 3, 12)
    # per image overall: A 5, B 1, C 6
    assert stats["masks_per_image"] == pytest.approx(
        {"mean": 4.0, "median": 5.0, "p90": np.percentile([5, 1, 6], 90)}
    )
    assert stats["relative_size"]["counts"] == [3, 2, 3, 2, 1, 1]
    assert stats["predicted_iou"]["counts"] == [1, 0, 0, 0, 0, 0, 0, 0, 1, 8]  # 0.9 and 1.02 -> top
    assert stats["predicted_iou"]["masks_without"] == 2
    assert stats["stability_score"]["counts"] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 9]
    assert stats["sources"] == {"annotator-1": 2, "model": 10}

    auto, semi = stats["groups"]
    assert (auto["round"], auto["stage"], auto["images"], auto["masks"]) == (1, "auto", 3, 10)
    assert auto["masks_per_image"] == pytest.approx(
        {"mean": 10 / 3, "median": 3.0, "p90": np.percentile([3, 1, 6], 90)}
    )
    assert auto["relative_size"]["counts"] == [3, 2, 2, 1, 1, 1]
    assert (semi["round"], semi["stage"], semi["images"], semi["masks"]) == (2, "semi", 1, 2)
    assert semi["masks_per_image"] == {"mean": 2.0, "median": 2.0, "p90": 2.0}
    assert semi["predicted_iou"] == {
        "edges": pytest.approx(np.linspace(0, 1, 11)),
        "counts": [0] * 10,
        "masks_without": 2,
    }

    assert stats["failures"]["total"] == 3
    assert stats["failures"]["groups"] == [
        {"round": 1, "stage": "auto", "failures": 2},
        {"round": 2, "stage": "semi", "failures": 1},
    ]
    assert stats["failures"]["top_errors"][0] == {"error": "CUDA out of memory", "count": 2}
    assert [(r["round"], r["images"], r["masks"], r["metrics"]) for r in stats["rounds"]] == [
        (1, 3, 10, {"miou": 0.7, "ap": 0.5}),
        (2, 1, 2, {"miou": 0.8}),
    ]
    assert store.read_table("rounds").column("masks").to_pylist() == [10, 2]
    text = format_stats(stats)
    assert "masks per image  mean 4.0  median 5.0  p90 5.8" in text
    assert "failures 3" in text


def test_stored_columns_round_trip(store):
    _fill(store)
    with Catalog(store) as catalog:
        clicks, seconds, model_version, area, bbox = catalog.query(
            "SELECT clicks, seconds, model_version, area, bbox FROM masks WHERE stage = 'semi' "
            "ORDER BY area LIMIT 1"
        )[1][0]
        assert clicks == [{"x": 12.0, "y": 14.0, "label": 1}, {"x": 50.0, "y": 50.0, "label": 0}]
        assert (seconds, model_version, area, list(bbox)) == (4.5, 1, 400, [5, 10, 20, 20])
        types = dict(
            catalog.query("SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM masks)")[1]
        )
        assert types["round"] == "INTEGER" and types["bbox"] == "FLOAT[4]"


def test_empty_store_has_every_view(store, tmp_path):
    with Catalog(store) as catalog:
        for table in ("images", "masks", "rounds", "failures", "models"):
            assert catalog.query(f"SELECT count(*) FROM {table}")[1] == [(0,)]
        stats = compute_stats(catalog)
    assert stats["masks"] == 0 and stats["groups"] == []
    assert "masks    0" in format_stats(stats)
    with Catalog(store) as catalog:
        assert len(plot_stats(catalog, str(tmp_path / "plots"))) == 5  # learning curves: empty


def test_models_view(store):
    store.write_model(
        1,
        b"weights",
        {
            "round": 1,
            "config": {"encoder_depth": 2},
            "metrics": {"miou": 0.7},
            "created_at": "2025-01-02T03:04:05+00:00",
        },
    )
    with Catalog(store) as catalog:
        (version, round_, uri, config, metrics) = catalog.query(
            "SELECT version, round, uri, config, metrics FROM models"
        )[1][0]
    assert (version, round_, json.loads(config), json.loads(metrics)) == (
        1,
        1,
        {"encoder_depth": 2},
        {"miou": 0.7},
    )
    assert uri.endswith("models/v1/model.pt")
    assert store.fs.cat_file(store.path("models", "v1", "model.pt")) == b"weights"


def test_plots_are_written(store, tmp_path):
    _fill(store)
    with Catalog(store) as catalog:
        paths = plot_stats(catalog, str(tmp_path / "plots"))
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "masks_per_image.png",
        "relative_mask_size.png",
        "mask_centres.png",
        "scores.png",
        "learning_curves.png",
    ]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300


def test_cli_commands(tmp_path, store, capsys):
    annotations, images, _ = make_coco(tmp_path)
    url = store.url
    assert (
        main(
            [
                "import-coco",
                "--annotations",
                str(annotations),
                "--images",
                str(images),
                "--store",
                url,
            ]
        )
        == 0
    )
    assert "imported 4 images and 6 masks" in capsys.readouterr().out

    assert main(["stats", "--store", url, "--json", "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr()
    stats = json.loads(out.out)
    assert (stats["images"], stats["masks"], stats["groups"][0]["stage"]) == (4, 6, "gt")
    assert "mask_centres.png" in out.err
    assert (tmp_path / "plots" / "learning_curves.png").exists()

    assert (
        main(
            [
                "query",
                "--store",
                url,
                "SELECT category, count(*) AS n FROM masks GROUP BY category ORDER BY category",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "category\tn\nfig\t3\nnut\t3\n"
    assert main(["query", "--store", url, "SELECT nope FROM masks"]) == 2
    assert "nope" in capsys.readouterr().err

    out_file = tmp_path / "out.json"
    assert (
        main(
            [
                "export",
                "--store",
                url,
                "--format",
                "coco",
                "--out",
                str(out_file),
                "--where",
                "m.category = 'fig'",
            ]
        )
        == 0
    )
    assert len(json.loads(out_file.read_text())["annotations"]) == 3
    assert (
        main(["export", "--store", url, "--format", "sa1b", "--out", str(tmp_path / "sa1b")]) == 0
    )
    assert len(list((tmp_path / "sa1b").glob("*.json"))) == 4  # d.png too, with no masks
    capsys.readouterr()

    (images / "a.png").unlink()
    assert (
        main(
            [
                "import-coco",
                "--annotations",
                str(annotations),
                "--images",
                str(images),
                "--store",
                url,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "maskmill import-coco: images[0] (id=1, file_name='a.png'): " in err
    assert "a.png: missing: image file not found" in err


def test_boundary_histograms_bin_as_the_bucket_expressions():
    """``compute_stats`` bins with ``histogram(x, boundaries)`` (fast on millions of rows):
    every value lands in the bin of ``size_bucket_sql`` / ``score_bucket_sql``, at the edges
    (float32 scores such as 0.9, exact size edges), outside [0, 1] and NULL included."""
    import duckdb

    from maskmill.storage.stats import (
        SIZE_EDGES,
        score_boundaries_sql,
        score_bucket_sql,
        size_boundaries_sql,
        size_bucket_sql,
    )

    edges = [e for e in SIZE_EDGES] + [k / 10 for k in range(11)]
    near = [np.nextafter(e, d) for e in edges for d in (-1.0, 2.0)]
    values = [*edges, *near, -0.3, 1.02, 7.0, *np.random.default_rng(0).uniform(0, 1, 500)]
    scores = [float(np.float32(v)) for v in values]  # as stored: float32
    con = duckdb.connect()
    con.execute("CREATE TABLE t (x DOUBLE, s FLOAT)")
    # One NULL score (an annotated mask); sizes are never NULL (height and width > 0).
    rows = [*zip(values, scores, strict=True), (0.5, None)]
    con.executemany("INSERT INTO t VALUES (?, ?)", rows)
    for expected, fast, counted in (
        (f"histogram({size_bucket_sql('x')})", f"histogram(x, {size_boundaries_sql()})", 1),
        (
            f"histogram({score_bucket_sql('s')})",
            f"histogram(s::DOUBLE, {score_boundaries_sql()})",
            0,
        ),
    ):
        want, got = con.execute(f"SELECT {expected}, {fast} FROM t").fetchone()
        binned = [n for _, n in sorted(got.items())]
        assert binned == [want.get(i, 0) for i in range(len(binned))]
        assert sum(binned) == len(values) + counted

"""The edges of the ``maskmill`` command line (issue 12): a command on a path with no store, a
bad file or bad SQL ends in one line ``maskmill <command>: ...`` and exit 2 (a traceback only
with ``--debug``); an export says whether it kept images without matching masks; ``run --help``
states the thresholds the models really use; a run that keeps almost nothing says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskmill.engine.report import auto_stage_warning
from maskmill.storage import Store, import_coco
from tests.test_storage_data import make_coco


def maskmill(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real ``maskmill`` entry point in a subprocess."""
    command = [sys.executable, "-m", "maskmill.flows.cli", *args]
    environ = {k: v for k, v in os.environ.items() if k != "MASKMILL_DEBUG"} | (env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environ)


@pytest.fixture()
def store(tmp_path) -> Store:
    """A store holding make_coco's ground truth: images a, b, c with masks, d without."""
    annotations, images, _ = make_coco(tmp_path)
    store = Store(str(tmp_path / "store"))
    import_coco(str(annotations), str(images), store)
    return store


# ------------------------------------------------------------------- 1. reading needs a store


@pytest.mark.parametrize(
    "command, kind",
    [
        (["stats"], "missing"),
        (["query", "SELECT count(*) FROM masks"], "missing"),
        (["export", "--format", "coco", "--out", "OUT"], "missing"),
        (["stats"], "file"),
        (["export", "--format", "sa1b", "--out", "OUT"], "folder"),
    ],
)
def test_reading_commands_refuse_a_path_with_no_store(tmp_path, command, kind):
    path = tmp_path / "typo"
    if kind == "file":
        path.write_text("not a store")
    elif kind == "folder":
        (path / "photos").mkdir(parents=True)
    out = str(tmp_path / "out")
    result = maskmill(
        command[0], "--store", str(path), *[out if a == "OUT" else a for a in command[1:]]
    )
    reason = {
        "missing": "no store there (the path does not exist)",
        "file": "is a file, not a store folder",
        "folder": (
            "not a store (it has none of images/, masks/, rounds/, failures/, models/, reviews/)"
        ),
    }[kind]
    assert result.returncode == 2
    assert result.stderr == f"maskmill {command[0]}: {path}: {reason}\n"
    assert result.stdout == ""
    assert path.exists() == (kind != "missing")  # nothing created
    assert not Path(out).exists()


def test_import_coco_into_a_file_is_one_line(tmp_path):
    annotations, images, _ = make_coco(tmp_path)
    target = tmp_path / "a-file"
    target.write_text("not a store")
    result = maskmill(
        "import-coco",
        "--annotations",
        str(annotations),
        "--images",
        str(images),
        "--store",
        str(target),
    )
    assert result.returncode == 2
    assert result.stderr == f"maskmill import-coco: {target}: is a file, not a store folder\n"
    assert target.read_text() == "not a store"


# --------------------------------------------------------------- 6. one line, or a traceback


def test_segment_on_a_truncated_image_is_one_line(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    image = tmp_path / "cut.jpg"
    Image.fromarray(rgb).save(image, quality=90)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # the header is whole, the data cut short
    result = maskmill("segment", "--image", str(image), "--out", str(tmp_path / "seg.png"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"maskmill segment: {image}: truncated: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "seg.png").exists()


def test_bad_sql_is_one_line_naming_the_filter(store, tmp_path):
    out = tmp_path / "out.json"
    result = maskmill(
        "export",
        "--store",
        store.url,
        "--format",
        "coco",
        "--out",
        str(out),
        "--where",
        "stagee = 1",
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "maskmill export: --where 'stagee = 1': Binder Error: Referenced column \"stagee\" "
        "not found in FROM clause! Candidate bindings: "
    )
    assert result.stderr.count("\n") == 1 and "LINE 1" not in result.stderr
    assert not out.exists()
    result = maskmill("query", "--store", store.url, "SELECT stagee FROM masks")
    assert result.returncode == 2
    assert result.stderr.startswith('maskmill query: Binder Error: Referenced column "stagee"')
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("how", [["--debug"], {"MASKMILL_DEBUG": "1"}])
def test_debug_shows_the_traceback(tmp_path, how):
    path = tmp_path / "typo"
    flags, env = (how, None) if isinstance(how, list) else ([], how)
    result = maskmill(*flags, "stats", "--store", str(path), env=env)
    assert result.returncode == 1  # Python's own exit status for an uncaught exception
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.endswith(
        f"maskmill.storage.errors.NotAStoreError: {path}: no store there (the path does not "
        "exist)\n"
    )


def test_not_valid_json_names_the_position_once(tmp_path):
    """json's "Unterminated string starting at" and the position make one sentence, not
    "starting at at line ..."."""
    annotations = tmp_path / "cut.json"
    annotations.write_text('{"images": [], "annotations": [{"id": "unterminated')
    result = maskmill(
        "import-coco",
        "--annotations",
        str(annotations),
        "--images",
        str(tmp_path),
        "--store",
        str(tmp_path / "store"),
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"maskmill import-coco: {annotations}: not valid JSON: Unterminated string starting at "
        "line 1 column 39\n"
    )
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------- 4. images without matching masks


def test_export_says_whether_it_kept_images_without_matching_masks(store, tmp_path):
    everything = tmp_path / "all.json"
    result = maskmill(
        "export",
        "--store",
        store.url,
        "--format",
        "coco",
        "--out",
        str(everything),
        "--where",
        "m.stage = 'nope'",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"exported 0 masks of 4 images as coco to {everything} (4 of them without a matching "
        "mask; --only-images-with-masks drops them)\n"
    )
    assert len(json.loads(everything.read_text())["images"]) == 4

    figs = tmp_path / "figs.json"
    result = maskmill(
        "export",
        "--store",
        store.url,
        "--format",
        "coco",
        "--out",
        str(figs),
        "--where",
        "m.category = 'fig'",
        "--only-images-with-masks",
    )
    assert result.returncode == 0, result.stderr
    fig_images = json.loads(figs.read_text())["images"]
    assert result.stdout == (
        f"exported 3 masks of {len(fig_images)} images as coco to {figs} "
        f"({4 - len(fig_images)} images without a matching mask left out)\n"
    )
    assert 0 < len(fig_images) < 4
    # An image keeps its id whichever images are listed, so two exports of a store match.
    ids = {i["maskmill_image_id"]: i["id"] for i in json.loads(everything.read_text())["images"]}
    assert all(ids[i["maskmill_image_id"]] == i["id"] for i in fig_images)


# ------------------------------------------------------------- 5. run --help tells the truth


def test_run_help_states_the_thresholds_the_models_use():
    from maskmill.model import generator_presets, load_default
    from maskmill.model.presets import SAM_PRESETS

    result = maskmill("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    shipped = generator_presets(load_default())
    for key in ("pred_iou_thresh", "stability_score_thresh"):
        assert (
            f"the shipped model's {shipped['auto'][key]:g} automatic / "
            f"{shipped['semi'][key]:g} pre-fill, an official SAM file's "
            f"{SAM_PRESETS['auto'][key]:g} / {SAM_PRESETS['semi'][key]:g}"
        ) in text, key
    assert "0.88 / 0.92" in text and "default: the presets stored with each round's model" in text


# ---------------------------------------------------- 15. an automatic stage that keeps little


def _auto(round_: int, images: int, masks: int, **metrics) -> dict:
    return {"round": round_, "stage": "auto", "model_version": 1, "images": images,
            "masks": masks, **metrics}  # fmt: skip


def test_auto_stage_warning_when_fewer_masks_than_images():
    rows = [
        {"round": 1, "stage": "manual", "model_version": 1, "images": 2, "masks": 0},
        _auto(2, 2, 1, pred_iou_thresh=0.3, stability_score_thresh=0.6),
    ]
    assert auto_stage_warning(rows) == (
        "the automatic stage (round 2) kept 1 mask(s) on 2 images (0.50 per image) with model "
        "v1 at predicted IoU >= 0.3 and stability >= 0.6: it does not see these images' "
        "objects well. To keep more: start from a stronger model (--checkpoint, e.g. an "
        "official SAM file), lower --pred-iou-thresh / --stability-score-thresh, or annotate "
        "some of the images first (--annotations with --manual-rounds, or maskmill serve) so "
        "retraining adapts the model to them."
    )
    # the newest automatic round counts; no thresholds recorded: none named
    assert auto_stage_warning([_auto(1, 4, 40), _auto(3, 4, 0)]).startswith(
        "the automatic stage (round 3) kept 0 mask(s) on 4 images (0.00 per image) with "
        "model v1: it does not"
    )


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [{"round": 1, "stage": "manual", "model_version": 1, "images": 3, "masks": 0}],
        [_auto(1, 2, 2)],  # one mask per image is enough
        [_auto(1, 0, 0)],  # no image finished (every one failed): the failures say why
        [_auto(1, 2, 0), _auto(2, 2, 9)],
    ],
)
def test_no_auto_stage_warning(rows):
    assert auto_stage_warning(rows) is None

"""The data engine end to end: real Prefect flow runs (a test-harness server) on a real local Ray
cluster (2 CPUs), on generated scenes with ground truth and a fixed random-weight tiny model.

The random model rarely reaches the real acceptance IoU; the simulated annotator finishes each
object with strokes anyway, so these runs accept any overlap (``accept_iou`` 0.01: one click an
object, fast) and keep every generated mask (thresholds 0): what is tested is the machinery —
stages, versions, resume, failures, every object finished — not the model's quality.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maskmill.engine.run import EngineSettings, plan_of
from maskmill.engine.training.synthetic import write_coco
from maskmill.model import build_model, save_checkpoint
from maskmill.storage import Catalog, Store, rle
from maskmill.storage.queries import ground_truth, images_done
from tests.conftest import run_arguments
from tests.test_storage_images import BAD, GOOD, make_image_files

REPO = Path(__file__).resolve().parents[1]
MASKMILL = [sys.executable, "-m", "maskmill.flows.cli"]
# EngineSettings of a small, fast run: a 2x2 grid, any mask kept, any overlap accepted (see the
# module doc).
FAST = {
    "holdout": 0.25,
    "points_per_side": 2,
    "accept_iou": 0.01,
    "max_clicks": 3,
    "generator_options": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
    "progress": False,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "random-tiny.pt"
    save_checkpoint(build_model("tiny", seed=0), str(path))
    return str(path)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("scenes")
    annotations = write_coco(folder, 5, seed=3, height=96, width=96, parts=False)
    return str(folder / "images"), str(annotations)


def _masks(store: str) -> list[tuple]:
    with Catalog(store) as catalog:
        return catalog.con.execute(
            "SELECT mask_id, image_id, round, stage, model_version, segmentation, clicks "
            "FROM masks WHERE stage <> 'gt' ORDER BY mask_id"
        ).fetchall()


def test_two_round_run(prefect_server, ray_cluster, checkpoint, scenes, tmp_path):
    from prefect.artifacts import Artifact

    from maskmill.flows.data_engine import data_engine

    images, annotations = scenes
    store = str(tmp_path / "store")
    settings = EngineSettings(
        store=store,
        images=images,
        annotations=annotations,
        checkpoint=checkpoint,
        manual_rounds=1,
        semi_rounds=1,
        seed=0,
        workers=2,
        retrain_steps=2,
        **FAST,
    )
    rows = data_engine(settings)

    # three model versions: the start and one retrain after each annotated round, each
    # promoted or not on the round's validation image; a round uses the newest promoted one
    metas = Store(store).model_metas()
    assert [(m["version"], m["round"]) for m in metas] == [(1, 0), (2, 1), (3, 2)]
    promoted = [m["version"] for m in metas if m.get("promoted", True)]

    def used(round_: int) -> int:
        return max(v for v in promoted if metas[v - 1]["round"] < round_)

    assert [(r["round"], r["stage"], r["model_version"]) for r in rows] == [
        (1, "manual", 1),
        (2, "semi", used(2)),
        (3, "auto", used(3)),
    ]
    for meta in metas[1:]:
        # each round annotated 2 images and kept 1 for validation: the validation images of
        # every round so far decide, and earlier rounds' training images are replayed
        assert meta["validation"]["images"] == meta["round"]
        assert isinstance(meta["promoted"], bool)
        assert meta["metrics"]["train_images"] == meta["round"]
    by_stage = {r["stage"]: r for r in rows}
    # 5 scenes: 1 held out, 2 + 2 annotated, all 5 in the automatic pass
    assert [by_stage[s]["images"] for s in ("manual", "semi", "auto")] == [2, 2, 5]
    assert all(by_stage[s]["masks"] > 0 for s in ("manual", "semi", "auto"))
    assert by_stage["manual"]["clicks_per_mask"] == 1.0  # accepted at the first click
    for row in rows:
        assert row["masks_per_image"] == pytest.approx(row["masks"] / row["images"])
        assert 0.0 <= row["heldout_miou"] <= 1.0
    assert metas[1]["metrics"]["steps"] == 2 and metas[1]["metrics"]["workers"] == 2
    assert metas[1]["base_version"] == 1 and metas[2]["base_version"] == used(2)
    masks = _masks(store)
    assert len({m[0] for m in masks}) == len(masks)
    assert {m[3] for m in masks} == {"manual", "semi", "auto"}
    assert all(m[6] for m in masks if m[3] == "manual")  # click logs kept
    _check_objects_finished(store, by_stage)
    # the rounds table artifact of the stats flow
    artifact = Artifact.get("rounds")
    table = json.loads(artifact.data)
    assert [row["stage"] for row in table] == ["manual", "semi", "auto"]

    # A rerun of the finished run changes nothing: no new masks, no new model. Its settings come
    # as a deployment gives them: a dict, which Prefect validates into EngineSettings.
    shards = {p: os.path.getmtime(p) for p in Store(store).shards("masks")}
    data_engine(settings=settings.model_dump())
    assert _masks(store) == masks
    assert {p: os.path.getmtime(p) for p in Store(store).shards("masks")} == shards
    assert len(Store(store).model_metas()) == 3


def _check_objects_finished(store: str, by_stage: dict[str, dict]) -> None:
    """Every annotated mask matches a ground-truth object at IoU >= 0.95 (strokes finished what
    the random model's click could not); every object of >= 64 px on an annotated image has a
    mask (IoU >= 0.5), and the smaller ones the rounds skipped are counted; the semi round's
    pre-fill verdicts add up."""
    truth = ground_truth(store)
    with Catalog(store) as catalog:
        rows = catalog.con.execute(
            "SELECT round, stage, image_id, segmentation, height, width, source, strokes "
            "FROM masks WHERE stage IN ('manual', 'semi') ORDER BY mask_id"
        ).fetchall()
    for round_, stage in ((1, "manual"), (2, "semi")):
        row = by_stage[stage]
        small = 0
        for image_id in images_done(store, round_, stage):
            masks = [
                {"size": [h, w], "counts": counts}
                for r, _, i, counts, h, w, _, _ in rows
                if r <= round_ and i == image_id
            ]
            annotated = [
                {"size": [h, w], "counts": counts}
                for r, _, i, counts, h, w, source, _ in rows
                if r == round_ and i == image_id and source != "model"
            ]
            objects = truth[image_id]
            if annotated:
                assert (rle.ious(annotated, objects).max(axis=1) >= 0.95).all(), image_id
            covered = rle.ious(masks, objects).max(axis=0) >= 0.5
            big = rle.areas(objects) >= 64
            assert covered[big].all(), (stage, image_id)
            small += int((~big & ~covered).sum())
        assert row["skipped_small"] == small, stage
        assert row["skipped_budget"] == 0
        assert row["annotated"] > 0 and row["strokes_per_mask"] > 0  # a random model
        assert 0.0 <= row["model_iou_mean"] < 1.0
    semi = by_stage["semi"]
    kept = sum(1 for r in rows if r[1] == "semi" and r[6] == "model")
    assert semi["prefill_kept"] == kept
    assert semi["prefill"] == kept + semi["prefill_corrected"] + semi["prefill_deleted"]
    assert semi["prefill_deleted"] > 0  # a random model pre-fills wrong masks


# The killed run's settings: FAST's, with one Ray actor, no retraining and nothing held out
# (the held-out evaluation would only add to each attempt's time; what is tested is the
# resume), and the annotator's default 20 clicks (``maskmill run`` has no option for them).
RESUMED = {
    **FAST,
    "holdout": 0.0,
    "manual_rounds": 1,
    "semi_rounds": 1,
    "seed": 0,
    "workers": 1,
    "retrain_steps": 0,
    "max_clicks": 20,
}


def test_kill_and_resume_gives_the_masks_of_an_uninterrupted_run(
    prefect_server, ray_cluster, checkpoint, scenes, tmp_path, capsys
):
    """Three SIGKILLs, one inside each stage (assisted-manual, semi-automatic, the automatic
    pass on Ray), each after a random number of the stage's images are committed and before
    the last, each followed by a rerun of the same command, end with exactly the masks of an
    uninterrupted run (ids, stages, pixels)."""
    from maskmill.flows.cli import main
    from maskmill.flows.data_engine import data_engine

    images, annotations = scenes
    inputs = {"images": images, "annotations": annotations, "checkpoint": checkpoint}
    reference = EngineSettings(store=str(tmp_path / "reference"), **inputs, **RESUMED)
    data_engine(reference)
    expected = _masks(reference.store)
    assert expected
    # 5 scenes, none held out: 3 in the manual round, 2 in the semi one, 5 in the automatic pass
    sizes = {stage: len(ids) for _, stage, ids in plan_of(reference).rounds()}
    assert sizes == {"manual": 3, "semi": 2, "auto": 5}

    store = str(tmp_path / "killed")
    arguments = run_arguments({"store": store, **inputs, **RESUMED, "ray_address": ray_cluster})
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    rng = random.Random(6)
    for round_, stage, _ in plan_of(reference).rounds():
        # Kill inside the stage, however fast the machine: once this attempt has committed a
        # random number of its images (start-up, imports, Prefect and Ray, are behind it), but
        # not all: the next one is being worked on.
        kill_after = rng.randint(1, sizes[stage] - 1)
        err = tmp_path / f"{stage}.err"
        with open(err, "wb") as handle:  # a file: a pipe nobody reads could block the run
            process = subprocess.Popen(
                [*MASKMILL, *arguments], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=handle
            )
        try:
            deadline = time.monotonic() + 300
            while process.poll() is None and len(_committed(store, round_, stage)) < kill_after:
                assert time.monotonic() < deadline, f"{stage}: {kill_after} images not in 300 s"
                time.sleep(0.02)
            assert process.poll() is None, f"ended before the kill: {err.read_text()[-3000:]}"
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=60)
        done = len(_committed(store, round_, stage))
        assert kill_after <= done < sizes[stage], (stage, done)  # killed mid-stage
    # the same command once more, to the end (in this process: an attempt less to start)
    capsys.readouterr()
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "round" in printed and "auto" in printed
    assert _masks(store) == expected
    # no temp files left behind in the committed folders
    leftovers = [p for p in Path(store).rglob("*.tmp")]
    assert leftovers == []


def _committed(store: str, round_: int, stage: str) -> list[str]:
    """Images of a round and stage with their masks shard committed (none before the store
    exists)."""
    return Store(store).shard_keys("masks", round_, stage) if os.path.isdir(store) else []


def test_bad_images_are_recorded_and_the_round_completes(
    prefect_server, ray_cluster, checkpoint, tmp_path
):
    from maskmill.flows.data_engine import data_engine

    folder = tmp_path / "images"
    paths = make_image_files(folder)
    store = str(tmp_path / "store")
    rows = data_engine(
        EngineSettings(
            store=store,
            images=str(folder),
            checkpoint=checkpoint,
            manual_rounds=0,
            semi_rounds=0,
            workers=1,
            retrain_steps=0,
            **FAST,
        )
    )
    assert [(r["round"], r["stage"]) for r in rows] == [(1, "auto")]
    with Catalog(store) as catalog:
        failures = dict(catalog.con.execute("SELECT uri, error FROM failures").fetchall())
        done = {
            uri: (h, w)
            for uri, h, w in catalog.con.execute(
                "SELECT i.uri, m.height, m.width FROM masks m JOIN images i USING (image_id) "
                "WHERE m.stage = 'auto'"
            ).fetchall()
        }
        registered = {u for (u,) in catalog.con.execute("SELECT uri FROM images").fetchall()}
        stages = dict(catalog.con.execute("SELECT uri, stage FROM failures").fetchall())
    for kind, reason in BAD.items():
        assert paths[kind] in failures, kind
        assert f": {reason}: " in failures[paths[kind]], failures[paths[kind]]
    # validated once, at ingest: no bad file enters the images table, so none fails in a round
    assert not {paths[k] for k in BAD} & registered
    assert {stages[paths[k]] for k in BAD} == {"ingest"}
    # every good kind is processed, its masks on the stored pixel grid (EXIF not applied)
    for kind in GOOD:
        assert paths[kind] not in failures, failures.get(paths[kind])
    assert rows[0]["images"] == len(GOOD)
    for kind in GOOD:
        if paths[kind] in done:
            assert done[paths[kind]] == (32, 40), kind
    assert paths["exif_rotated"] in done
    assert rows[0]["failures"] == 0

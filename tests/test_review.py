"""Review (mask verification) and the per-person figures of issue 13: verdicts in the reviews
table, the review queue (never the reviewer's own masks), what review changes in training,
export and the annotation queue, the acceptance and per-annotator tables of ``maskmill stats``,
the review routes of the web app, and the review page in headless Chromium.

The store is built here: generated scenes imported as ground truth, then round 1 (manual)
written as two people would have: alice on two images, bob on one, and the model's pre-fill on
alice's first; bob once more in round 2. Their masks are ground-truth objects, so every figure
below is counted by hand from these records.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

with warnings.catch_warnings():  # starlette >= 1.0 prefers httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from maskmill.engine.evaluate import interior_point
from maskmill.engine.training.synthetic import write_coco
from maskmill.engine.web.app import create_app
from maskmill.engine.web.review import HANDOUT_TTL_S, ReviewDesk
from maskmill.engine.web.session import AnnotationSession, WebAnnotator
from maskmill.model import build_model
from maskmill.storage import Catalog, StageWriter, Store, compute_stats, format_stats, rle
from maskmill.storage.coco import export_coco
from maskmill.storage.queries import (
    existing_masks,
    ground_truth,
    image_infos,
    review_masks,
    review_queue,
    training_set,
)
from maskmill.storage.reviews import write_verdicts
from tests.test_serve import CHROMIUM_ARGS, chromium, live_server  # noqa: F401 - a fixture

JSON = {"Content-Type": "application/json"}
T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.timezone.utc)

# What each person drew: (round, image number, gt object, clicks, seconds, strokes).
DRAWN = {
    "web:alice": [(1, 0, 0, 2, 4.0, 1), (1, 0, 1, 1, 6.0, 0), (1, 2, 0, 1, 2.0, None)],
    "web:bob": [(1, 1, 0, 3, 5.0, 0), (1, 1, 1, 1, 3.0, 2), (2, 0, 2, 1, 1.0, 0)],
}


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("review-scenes")
    annotations = write_coco(folder, 3, seed=11, height=120, width=160, parts=False)
    return str(folder / "images"), str(annotations)


def make_store(path: Path, scenes: tuple[str, str]) -> Store:
    """Ground truth, then the people's masks of ``DRAWN`` and the model's pre-fill (object 3
    of image 0, round 1)."""
    from maskmill.storage import import_coco

    images, annotations = scenes
    import_coco(annotations, images, str(path))
    store = Store(str(path))
    truth = ground_truth(store)
    ids = sorted(truth)
    shards: dict[tuple[int, str], list[dict]] = {}
    for source, drawn in DRAWN.items():
        for round_, image, obj, clicks, seconds, strokes in drawn:
            image_id = ids[image]
            shards.setdefault((round_, image_id), []).append(
                {
                    "image_id": image_id,
                    "segmentation": truth[image_id][obj],
                    "source": source,
                    "clicks": [[5.0 + k, 5.0, 1] for k in range(clicks)],
                    "seconds": seconds,
                    "strokes": strokes,
                }
            )
    shards[(1, ids[0])].append(
        {"image_id": ids[0], "segmentation": truth[ids[0]][3], "predicted_iou": 0.9}
    )
    for (round_, image_id), records in sorted(shards.items()):
        with StageWriter(store, round_, "manual") as writer:
            records = [{**r, "index": i} for i, r in enumerate(records)]
            writer.write_masks(image_id, records, model_version=round_)
    return store


@pytest.fixture()
def store(tmp_path, scenes) -> Store:
    return make_store(tmp_path / "store", scenes)


def ids_of(store: Store) -> list[str]:
    return sorted(ground_truth(store))


def mask_of(store: Store, image: int, index: int, round_: int = 1) -> str:
    """The mask id of the ``index``-th mask of image number ``image`` in round ``round_``."""
    return rle.mask_id(ids_of(store)[image], round_, "manual", index)


def reviews(store: Store) -> list[dict]:
    with Catalog(store) as catalog:
        columns, rows = catalog.query(
            "SELECT mask_id, image_id, round, stage, reviewer, verdict, reason, correction, "
            "correction_area, correction_bbox, seconds FROM reviews ORDER BY reviewed_at, mask_id"
        )
    return [dict(zip(columns, row, strict=True)) for row in rows]


def review_scenario(store: Store) -> dict:
    """The verdicts the figures below are counted from. Returns bob's correction of alice's
    second mask on image 0."""
    truth = ground_truth(store)
    ids = sorted(truth)
    correction = rle.encode(rle.decode(truth[ids[0]][1]) | _square(120, 160, 40, 40, 12))
    # bob judges alice's image 0: the first approved, the second rejected and corrected
    write_verdicts(
        store,
        "web:bob",
        ids[0],
        [
            {"mask_id": mask_of(store, 0, 0), "verdict": "approved", "seconds": 2.5},
            {
                "mask_id": mask_of(store, 0, 1),
                "verdict": "rejected",
                "reason": "misses the lower part",
                "correction": correction,
                "seconds": 7.0,
            },
        ],
        reviewed_at=T0,
    )
    # carol rejects alice's image 2; dave, later, approves it: the newest verdict stands
    write_verdicts(
        store,
        "web:carol",
        ids[2],
        [{"mask_id": mask_of(store, 2, 0), "verdict": "rejected", "reason": "wrong object"}],
        reviewed_at=T0,
    )
    write_verdicts(
        store,
        "web:dave",
        ids[2],
        [{"mask_id": mask_of(store, 2, 0), "verdict": "approved"}],
        reviewed_at=T0 + dt.timedelta(minutes=5),
    )
    # alice judges bob's first mask of image 1; his second stays unreviewed
    write_verdicts(
        store,
        "web:alice",
        ids[1],
        [{"mask_id": mask_of(store, 1, 0), "verdict": "approved"}],
        reviewed_at=T0,
    )
    return correction


def _square(height: int, width: int, x: int, y: int, size: int) -> np.ndarray:
    out = np.zeros((height, width), bool)
    out[y : y + size, x : x + size] = True
    return out


def post(client: TestClient, path: str, body: object):
    return client.post(path, content=json.dumps(body), headers=JSON)


# ---------------------------------------------------------------------- verdicts in storage


def test_verdicts_are_stored_and_read_back(store):
    ids = ids_of(store)
    correction = review_scenario(store)
    rows = reviews(store)
    assert len(rows) == 5
    bobs = {r["mask_id"]: r for r in rows if r["reviewer"] == "web:bob"}
    first, second = bobs[mask_of(store, 0, 0)], bobs[mask_of(store, 0, 1)]
    assert (first["mask_id"], first["image_id"], first["round"], first["stage"]) == (
        mask_of(store, 0, 0),
        ids[0],
        1,
        "manual",
    )
    assert (first["verdict"], first["reason"], first["correction"], first["seconds"]) == (
        "approved",
        None,
        None,
        2.5,
    )
    assert (second["verdict"], second["reason"]) == ("rejected", "misses the lower part")
    assert second["correction"] == correction["counts"]
    assert second["correction_area"] == int(rle.areas([correction])[0])
    assert list(second["correction_bbox"]) == [float(v) for v in rle.bboxes([correction])[0]]

    # Read back per image, each mask with its standing (newest) verdict, in stored order.
    masks = review_masks(store, ids[2], 1, "manual")
    assert [(m["source"], m["verdict"], m["reviewer"]) for m in masks] == [
        ("web:alice", "approved", "web:dave")
    ]
    on_zero = review_masks(store, ids[0], 1, "manual")
    assert [(m["source"], m["reviewable"], m["verdict"]) for m in on_zero] == [
        ("web:alice", True, "approved"),
        ("web:alice", True, "rejected"),
        ("model", False, None),
    ]
    assert on_zero[1]["correction"] == correction

    # The same reviewer sending the same masks again replaces the shard: still one verdict each.
    write_verdicts(
        store,
        "web:alice",
        ids[1],
        [{"mask_id": mask_of(store, 1, 0), "verdict": "rejected", "reason": "on second look"}],
        reviewed_at=T0 + dt.timedelta(minutes=9),
    )
    again = [r for r in reviews(store) if r["reviewer"] == "web:alice"]
    assert [(r["verdict"], r["reason"]) for r in again] == [("rejected", "on second look")]


@pytest.mark.parametrize(
    "reviewer, verdict, words",
    [
        ("web:alice", {"mask": (0, 0), "verdict": "approved"}, "the reviewer's own"),
        ("web:bob", {"mask": (0, 2), "verdict": "approved"}, "model's; nobody reviews"),
        ("web:bob", {"mask_id": "00000000", "verdict": "approved"}, "no mask '00000000'"),
        ("web:bob", {"mask": (0, 0), "verdict": "maybe"}, "verdict must be one of"),
        ("web:bob", {"mask": (0, 0), "verdict": "approved", "seconds": -1}, "seconds must"),
        ("web:bob", {"mask": (0, 0), "verdict": "approved", "reason": "x" * 501}, "reason"),
        (
            "web:bob",
            {"mask": (0, 0), "verdict": "approved", "correction": "square"},
            "a correction replaces a rejected mask",
        ),
        ("web:bob", {"mask": (0, 0), "verdict": "rejected", "correction": "empty"}, "empty"),
        ("web:bob", {"mask": (0, 0), "verdict": "rejected", "correction": "small"}, "size"),
    ],
)
def test_bad_verdicts_are_refused_and_nothing_is_written(store, reviewer, verdict, words):
    ids = ids_of(store)
    item = dict(verdict)
    if "mask" in item:
        item["mask_id"] = mask_of(store, *item.pop("mask"))
    corrections = {
        "square": rle.encode(_square(120, 160, 0, 0, 10)),
        "empty": rle.encode(np.zeros((120, 160), bool)),
        "small": rle.encode(np.ones((12, 16), bool)),
    }
    if "correction" in item:
        item["correction"] = corrections[item["correction"]]
    with pytest.raises(ValueError, match=words):
        write_verdicts(store, reviewer, ids[0], [item])
    with pytest.raises(ValueError, match="more than once"):
        twice = {"mask_id": mask_of(store, 0, 0), "verdict": "approved"}
        write_verdicts(store, "web:bob", ids[0], [twice, twice])
    assert reviews(store) == []
    assert store.shards("reviews") == []


def test_a_reviewer_never_gets_their_own_masks(store):
    ids = ids_of(store)
    # alice drew images 0 and 2, bob image 1 (round 1); the model's pre-fill is nobody's to judge
    assert review_queue(store, 1, "manual", "web:alice") == [ids[1]]
    assert review_queue(store, 1, "manual", "web:bob") == [ids[0], ids[2]]
    assert review_queue(store, 1, "manual", "web:carol") == ids
    assert review_queue(store, 2, "manual", "web:bob") == []
    assert review_queue(store, 2, "manual", "web:alice") == [ids[0]]
    review_scenario(store)
    # Reviewed masks leave the queue: only bob's second mask of image 1 is left.
    assert review_queue(store, 1, "manual", "web:carol") == [ids[1]]
    assert review_queue(store, 1, "manual", "web:bob") == []


# ---------------------------------------------------------------------- figures (DuckDB)


def test_acceptance_and_per_annotator_tables_match_hand_counts(store):
    with Catalog(store) as catalog:
        before = compute_stats(catalog)
    assert [a["reviewed"] for a in before["annotators"]] == [0, 0]
    assert [a["acceptance_rate"] for a in before["annotators"]] == [None, None]
    assert before["reviews"]["verdicts"] == 0 and before["reviews"]["groups"] == []

    review_scenario(store)
    with Catalog(store) as catalog:
        stats = compute_stats(catalog)
    table = {a["annotator"]: a for a in stats["annotators"]}
    assert list(table) == ["web:alice", "web:bob"]  # neither "model" nor "gt"
    for source, drawn in DRAWN.items():
        row = table[source]
        assert row["images"] == len({(image) for _, image, *_ in drawn})
        assert row["masks"] == len(drawn)
        assert row["seconds_per_mask"] == pytest.approx(np.mean([d[4] for d in drawn]))
        assert row["clicks_per_mask"] == pytest.approx(np.mean([d[3] for d in drawn]))
        assert row["strokes_per_mask"] == pytest.approx(np.mean([d[5] or 0 for d in drawn]))
    # alice: image 0's two masks (approved; rejected and corrected) and image 2's (rejected by
    # carol, then approved by dave: the newest counts): 2 of 3. bob: 1 of 1 (his second and his
    # round-2 mask are unreviewed).
    assert (table["web:alice"]["reviewed"], table["web:alice"]["approved"]) == (3, 2)
    assert table["web:alice"]["acceptance_rate"] == pytest.approx(2 / 3)
    assert (table["web:bob"]["reviewed"], table["web:bob"]["acceptance_rate"]) == (1, 1.0)

    review = stats["reviews"]
    assert (review["verdicts"], review["reviewers"], review["masks_reviewed"]) == (5, 4, 4)
    assert (review["approved"], review["rejected"], review["corrected"]) == (3, 1, 1)
    assert review["acceptance_rate"] == pytest.approx(0.75)
    assert review["groups"] == [
        {
            "round": 1,
            "stage": "manual",
            "reviewed": 4,
            "approved": 3,
            "rejected": 1,
            "corrected": 1,
            "acceptance_rate": pytest.approx(0.75),
        }
    ]
    text = format_stats(stats)
    assert "annotators (a person's masks" in text
    assert any(
        line.split()[:3] == ["web:alice", "2", "3"] and line.endswith("66.7 %")
        for line in text.splitlines()
    )
    group = "  round 1 manual 4 reviewed, 3 approved, 1 rejected (1 corrected), acceptance 75.0 %"
    assert group in text.splitlines()


# ----------------------------------------------------- what review changes downstream


def _masks_by_image(samples: list[dict]) -> dict[str, list[str]]:
    return {s["image_id"]: sorted(m["counts"] for m in s["masks"]) for s in samples}


def test_training_export_and_the_annotation_queue_honour_verdicts(store, tmp_path):
    ids = ids_of(store)
    truth = ground_truth(store)
    gt_masks = sum(len(v) for v in truth.values())
    alice0, alice1, alice2 = truth[ids[0]][0], truth[ids[0]][1], truth[ids[2]][0]
    bob0, bob1, bob_r2 = truth[ids[1]][0], truth[ids[1]][1], truth[ids[0]][2]
    model0 = truth[ids[0]][3]

    def counts(*masks: dict) -> list[str]:
        return sorted(m["counts"] for m in masks)

    # No verdict anywhere: everything counts, as before review existed.
    everything = {
        ids[0]: counts(alice0, alice1, model0, bob_r2),
        ids[1]: counts(bob0, bob1),
        ids[2]: counts(alice2),
    }
    assert _masks_by_image(training_set(store, ["manual"], 3, min_mask_area=0)) == everything
    assert export_coco(store, str(tmp_path / "all.json"))["masks"] == gt_masks + 7

    # carol rejects alice's mask on image 2: it no longer covers its object (the next round
    # that annotates image 2 draws it again), and round 1 now counts approved masks only.
    write_verdicts(
        store,
        "web:carol",
        ids[2],
        [{"mask_id": mask_of(store, 2, 0), "verdict": "rejected"}],
        reviewed_at=T0,
    )
    covering = existing_masks(store, ids, 3)
    assert covering[ids[2]] == []
    assert sorted(m["counts"] for m in covering[ids[1]]) == counts(bob0, bob1)

    correction = review_scenario(store)
    # Round 1 has verdicts: its approved masks, bob's correction in place of alice's second,
    # the model's pre-fill (nobody reviews it); bob's unreviewed second mask is left out.
    # Round 2 has none: bob's mask there counts.
    default = {
        ids[0]: counts(alice0, correction, model0, bob_r2),
        ids[1]: counts(bob0),
        ids[2]: counts(alice2),
    }
    assert _masks_by_image(training_set(store, ["manual"], 3, min_mask_area=0)) == default
    strict = {ids[0]: counts(alice0, correction), ids[1]: counts(bob0), ids[2]: counts(alice2)}
    approved = training_set(store, ["manual"], 3, min_mask_area=0, approved_only=True)
    assert _masks_by_image(approved) == strict
    # Covering: every mask but a rejected one (the correction covers alice's second object).
    covering = existing_masks(store, ids, 3)
    assert sorted(m["counts"] for m in covering[ids[0]]) == counts(
        alice0, correction, model0, bob_r2
    )
    assert sorted(m["counts"] for m in covering[ids[1]]) == counts(bob0, bob1)
    assert covering[ids[2]] == [alice2]  # dave's approval, newer than carol's rejection

    out = tmp_path / "default.json"
    assert export_coco(store, str(out))["masks"] == gt_masks + 6
    annotations = json.loads(out.read_text())["annotations"]
    fixed = [a for a in annotations if a["mask_id"] == mask_of(store, 0, 1)]
    assert len(fixed) == 1
    assert fixed[0]["segmentation"]["counts"] == correction["counts"]
    assert fixed[0]["source"] == "web:bob"  # the reviewer's correction
    assert fixed[0]["area"] == int(rle.areas([correction])[0])
    assert fixed[0]["bbox"] == [float(v) for v in rle.bboxes([correction])[0]]
    out = tmp_path / "approved.json"
    assert export_coco(store, str(out), approved_only=True)["masks"] == gt_masks + 4
    sources = sorted(a["source"] for a in json.loads(out.read_text())["annotations"])
    # alice's two approved masks, bob's approved one and his correction of alice's second
    assert sources == ["gt"] * gt_masks + ["web:alice", "web:alice", "web:bob", "web:bob"]


# ------------------------------------------------------------------------ the review routes


@pytest.fixture()
def session(store, model):
    """bob's server, without accounts: bob (the session's annotator) reviews."""
    with AnnotationSession(store, 1, "manual", model, 1, WebAnnotator("bob")) as session:
        yield session


def test_review_routes_approve_reject_and_correct(store, session):
    ids = ids_of(store)
    truth = ground_truth(store)
    with TestClient(create_app(session)) as client:
        page = client.get("/review")
        assert page.status_code == 200 and "maskmill review" in page.text
        state = client.get("/api/review/next").json()
        assert (state["reviewer"], state["done"], state["remaining"]) == ("web:bob", False, 2)
        assert state["image"]["image_id"] == ids[0]
        assert [m["source"] for m in state["masks"]] == ["web:alice", "web:alice"]
        assert [m["mask"] for m in state["masks"]] == [truth[ids[0]][0], truth[ids[0]][1]]
        assert [m["clicks"] for m in state["masks"]] == [2, 1]
        assert [o["source"] for o in state["others"]] == ["model"]
        # Asking again (a reload) gives the same image.
        assert client.get("/api/review/next").json()["image"]["image_id"] == ids[0]

        first, second = (m["mask_id"] for m in state["masks"])
        brush = {"mode": "brush", "radius": 3, "points": [[10, 10], [30, 10]]}
        eraser = {"mode": "eraser", "radius": 2, "points": [[18, 10], [22, 10]]}
        refusals = [
            (ids[0], {"verdicts": [{"mask_id": first, "verdict": "ok"}]}, 422, "verdict must"),
            (ids[0], {"verdicts": []}, 422, "1..1000"),
            (ids[0], {"verdicts": [{"mask_id": first, "verdict": "approved", "x": 1}]}, 422, "x"),
            (ids[0], {"verdicts": [{"mask_id": "nope", "verdict": "approved"}]}, 422, "no mask"),
            ("nope", {"verdicts": [{"mask_id": first, "verdict": "approved"}]}, 404, "no image"),
            (
                ids[0],
                {"verdicts": [{"mask_id": first, "verdict": "rejected", "strokes": [{}]}]},
                422,
                "strokes[0]",
            ),
            (
                ids[0],
                {
                    "verdicts": [
                        {"mask_id": first, "verdict": "rejected", "strokes": [[1, 2]]},
                    ]
                },
                422,
                "strokes[0]",
            ),
            (
                ids[0],
                {
                    "verdicts": [
                        {
                            "mask_id": first,
                            "verdict": "rejected",
                            "strokes": [{"mode": "brush", "radius": 3, "points": [[999, 1]]}],
                        }
                    ]
                },
                422,
                "outside the image",
            ),
            (  # bob's own mask (image 1) is never his to judge
                ids[1],
                {"verdicts": [{"mask_id": mask_of(store, 1, 0), "verdict": "approved"}]},
                403,
                "your own",
            ),
        ]
        for image_id, body, status, words in refusals:
            answer = post(client, f"/api/review/{image_id}/verdicts", body)
            assert answer.status_code == status, (body, answer.text)
            assert words in answer.json()["error"]
        assert reviews(store) == []

        answer = post(
            client,
            f"/api/review/{ids[0]}/verdicts",
            {
                "verdicts": [
                    {"mask_id": first, "verdict": "approved", "seconds": 1.5},
                    {
                        "mask_id": second,
                        "verdict": "rejected",
                        "reason": "too small",
                        "strokes": [brush, eraser],
                    },
                ]
            },
        )
        assert answer.status_code == 200, answer.text
        after = answer.json()
        assert after["stored"] == 2
        assert after["image"]["image_id"] == ids[2] and after["remaining"] == 1

        # Judged meanwhile (another reviewer): told, not stored twice.
        again = post(
            client,
            f"/api/review/{ids[0]}/verdicts",
            {"verdicts": [{"mask_id": first, "verdict": "rejected"}]},
        )
        assert again.status_code == 409 and "reviewed meanwhile by web:bob" in again.json()["error"]

        post(
            client,
            f"/api/review/{ids[2]}/verdicts",
            {"verdicts": [{"mask_id": mask_of(store, 2, 0), "verdict": "approved"}]},
        )
        done = client.get("/api/review/next").json()
        assert (done["done"], done["image"], done["remaining"]) == (True, None, 0)

    rows = {r["mask_id"]: r for r in reviews(store)}
    assert len(rows) == 3
    assert (rows[first]["verdict"], rows[first]["reviewer"], rows[first]["seconds"]) == (
        "approved",
        "web:bob",
        1.5,
    )
    fixed = rows[second]
    assert (fixed["verdict"], fixed["reason"]) == ("rejected", "too small")
    # The correction: alice's mask with the brush stroke, then the eraser, painted as the
    # annotation page paints strokes (cv2 thick lines of width 2r).
    expected = rle.decode(truth[ids[0]][1])
    canvas = np.zeros(expected.shape, np.uint8)
    cv2.polylines(canvas, [np.int32([[10, 10], [30, 10]]).reshape(-1, 1, 2)], False, 1, 6)
    expected |= canvas.astype(bool)
    canvas = np.zeros(expected.shape, np.uint8)
    cv2.polylines(canvas, [np.int32([[18, 10], [22, 10]]).reshape(-1, 1, 2)], False, 1, 4)
    expected &= ~canvas.astype(bool)
    stored = rle.decode({"size": list(expected.shape), "counts": fixed["correction"]})
    assert np.array_equal(stored, expected)
    assert stored[10, 12] and not stored[10, 20]


def test_with_accounts_the_reviewer_is_the_logged_in_person(store, session):
    from maskmill.storage.accounts import Accounts

    ids = ids_of(store)
    accounts = Accounts(store)
    tokens = {name: accounts.add(name) for name in ("alice", "carol")}
    with TestClient(create_app(session)) as client:
        assert client.get("/api/review/next").status_code == 401

        def as_(name: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {tokens[name]}"}

        alice = client.get("/api/review/next", headers=as_("alice")).json()
        assert (alice["reviewer"], alice["image"]["image_id"]) == ("web:alice", ids[1])
        assert {m["source"] for m in alice["masks"]} == {"web:bob"}  # never her own
        carol = client.get("/api/review/next", headers=as_("carol")).json()
        assert (carol["reviewer"], carol["image"]["image_id"]) == ("web:carol", ids[0])
        own = client.post(
            f"/api/review/{ids[0]}/verdicts",
            content=json.dumps(
                {"verdicts": [{"mask_id": mask_of(store, 0, 0), "verdict": "approved"}]}
            ),
            headers={**JSON, **as_("alice")},
        )
        assert own.status_code == 403
        done = client.post(
            f"/api/review/{ids[0]}/verdicts",
            content=json.dumps(
                {"verdicts": [{"mask_id": mask_of(store, 0, 0), "verdict": "approved"}]}
            ),
            headers={**JSON, **as_("carol")},
        )
        assert done.status_code == 200 and done.json()["stored"] == 1
    assert [(r["reviewer"], r["verdict"]) for r in reviews(store)] == [("web:carol", "approved")]


def test_two_reviewers_get_different_images_until_a_hand_out_expires(store):
    ids = ids_of(store)
    now = [0.0]
    desk = ReviewDesk(store, 1, "manual", image_infos(store), clock=lambda: now[0])
    assert desk.next("web:carol")["image"]["image_id"] == ids[0]
    assert desk.next("web:dave")["image"]["image_id"] == ids[1]  # image 0 is carol's
    assert desk.next("web:carol")["image"]["image_id"] == ids[0]  # a reload: the same
    erin = desk.next("web:erin")  # only image 2 is free for her
    assert (erin["image"]["image_id"], erin["remaining"]) == (ids[2], 1)
    now[0] = HANDOUT_TTL_S / 2
    assert desk.next("web:dave")["image"]["image_id"] == ids[1]  # his page asks again
    now[0] = HANDOUT_TTL_S + 1  # carol and erin walked away: their images are free again
    assert desk.next("web:frank")["image"]["image_id"] == ids[0]
    assert desk.next("web:dave")["image"]["image_id"] == ids[1]


# --------------------------------------------------------------------------- the real CLI


def test_stats_cli_prints_the_per_annotator_table(store, tmp_path):
    review_scenario(store)
    command = [sys.executable, "-m", "maskmill.flows.cli", "stats", "--store", store.url]
    environ = {k: v for k, v in os.environ.items() if k != "MASKMILL_DEBUG"}
    text = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environ)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    header = lines.index(
        "annotators (a person's masks, every round and stage; acceptance: approved / reviewed)"
    )
    assert lines[header + 1].split() == [
        "annotator",
        "images",
        "masks",
        "s/mask",
        "clicks/mask",
        "strokes/mask",
        "reviewed",
        "accepted",
    ]
    assert lines[header + 2].split() == ["web:alice", "2", "3", "4.0", "1.33", "0.33", "3"] + [
        "66.7",
        "%",
    ]
    assert lines[header + 3].split() == ["web:bob", "2", "3", "3.0", "1.67", "0.67", "1"] + [
        "100.0",
        "%",
    ]
    assert any(line.startswith("reviews  5 verdicts by 4 reviewer(s)") for line in lines)

    result = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, timeout=300, env=environ
    )
    data = json.loads(result.stdout)
    assert [(a["annotator"], a["masks"], a["reviewed"]) for a in data["annotators"]] == [
        ("web:alice", 3, 3),
        ("web:bob", 3, 1),
    ]
    assert data["reviews"]["acceptance_rate"] == pytest.approx(0.75)

    out = tmp_path / "approved.json"
    export = [sys.executable, "-m", "maskmill.flows.cli", "export", "--store", store.url]
    result = subprocess.run(
        [*export, "--format", "coco", "--out", str(out), "--approved-only"],
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
    )
    assert result.returncode == 0, result.stderr
    sources = {a["source"] for a in json.loads(out.read_text())["annotations"]}
    assert sources == {"gt", "web:alice", "web:bob"}  # no model pre-fill, nothing unreviewed


# ---------------------------------------------------------------------------- in Chromium


@pytest.mark.parametrize("accounts", [False, True], ids=["no-accounts", "accounts"])
def test_review_page_in_chromium(chromium, store, model, tmp_path, accounts):  # noqa: F811
    """carol approves alice's first mask with a click on its button, selects the second by
    clicking it on the image, rejects it with R and a reason, and submits; on a server without
    accounts (she is its annotator), and logged in through her link (a cookie session: the
    page's POST carries the CSRF header)."""
    from playwright.sync_api import sync_playwright

    from maskmill.storage.accounts import Accounts

    ids = ids_of(store)
    truth = ground_truth(store)
    annotator = WebAnnotator("nobody" if accounts else "carol")
    token = Accounts(store).add("carol") if accounts else None
    with (
        AnnotationSession(store, 1, "manual", model, 1, annotator) as session,
        live_server(session) as base,
        sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 860, "height": 420},
            device_scale_factor=1,
        )
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            if token is not None:
                page.goto(f"{base}/login?token={token}")  # sets the session cookie
                page.wait_for_url(f"{base}/", timeout=60_000)  # its own move on to /
            page.goto(f"{base}/review")
            page.wait_for_selector('body[data-state="ready"]', timeout=60_000)
            assert page.locator("#image-id").inner_text() == f"image {ids[0]}"
            assert page.locator("#masks li").count() == 2
            page.click('#masks li[data-index="0"] button[data-verdict="approved"]')
            x, y = (int(v) for v in interior_point(rle.decode(truth[ids[0]][1])))
            client = page.evaluate("([x, y]) => window.maskmill.toClient(x, y)", [x, y])
            page.mouse.click(*client)
            assert page.locator('#masks li[data-index="1"]').get_attribute("class") == "selected"
            page.keyboard.press("r")
            page.fill('#masks li[data-index="1"] input.reason', "the wrong object")
            assert page.locator("body").get_attribute("data-decided") == "2"
            page.click("#submit")
            page.wait_for_selector('body[data-stored="2"]', timeout=30_000)
            assert page.locator("#image-id").inner_text() == f"image {ids[1]}"
            assert not errors, errors
        finally:
            context.close()

    rows = {r["mask_id"]: r for r in reviews(store)}
    assert {k: (v["verdict"], v["reviewer"], v["reason"]) for k, v in rows.items()} == {
        mask_of(store, 0, 0): ("approved", "web:carol", None),
        mask_of(store, 0, 1): ("rejected", "web:carol", "the wrong object"),
    }
    assert all(v["seconds"] is not None and v["seconds"] >= 0 for v in rows.values())

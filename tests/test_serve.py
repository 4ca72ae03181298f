"""The annotation page (``maskmill serve``): session, HTTP API, refusals, and the page itself in
headless Chromium.

Stores are built here from generated scenes (COCO ground truth imported as round 0); the model
is a ``tiny`` one with fixed random weights: any mask appearing is what is tested, not quality.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import cv2
import duckdb
import numpy as np
import pytest
from PIL import Image

with warnings.catch_warnings():  # starlette >= 1.0 prefers httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from maskmill.engine.evaluate import interior_point
from maskmill.engine.plan import model_bytes
from maskmill.engine.training.synthetic import write_coco
from maskmill.engine.web.app import create_app
from maskmill.engine.web.session import (
    IDLE_CAP_S,
    MAX_RADIUS,
    MAX_STROKE_POINTS,
    AnnotationSession,
    WebAnnotator,
    default_round,
    resolve_model,
)
from maskmill.flows.cli import build_parser, main
from maskmill.model import build_model, has_default, save_checkpoint
from maskmill.storage import Catalog, Store, import_coco, rle
from maskmill.storage.queries import categories, ground_truth

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "annotation_page.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
JSON = {"Content-Type": "application/json"}


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("serve-scenes")
    annotations = write_coco(folder, 3, seed=11, height=120, width=160, parts=False)
    return str(folder / "images"), str(annotations)


def make_store(path: Path, scenes: tuple[str, str]) -> Store:
    images, annotations = scenes
    import_coco(annotations, images, str(path))
    return Store(str(path))


@pytest.fixture()
def store(tmp_path, scenes) -> Store:
    return make_store(tmp_path / "store", scenes)


@pytest.fixture()
def session(store, model):
    with AnnotationSession(store, 1, "manual", model, 7, WebAnnotator("tester")) as session:
        yield session


@pytest.fixture()
def client(session):
    with TestClient(create_app(session)) as client:
        yield client


def object_point(store: Store, image_id: str) -> tuple[int, int]:
    """Integer XY deep inside the image's largest ground-truth object."""
    objects = ground_truth(store)[image_id]
    largest = max(objects, key=lambda o: int(rle.areas([o])[0]))
    x, y = interior_point(rle.decode(largest))
    return int(x), int(y)


def stored_masks(store: Store, round_: int = 1, stage: str = "manual") -> list[dict]:
    with Catalog(store) as catalog:
        columns, rows = catalog.query(
            "SELECT image_id, source, area, clicks, seconds, predicted_iou, model_version, "
            "segmentation, height, width, strokes, stroke_seconds, model_iou, category, "
            "category_id FROM masks WHERE round = ? AND stage = ? "
            "ORDER BY image_id, mask_id",
            [round_, stage],
        )
    return [dict(zip(columns, row, strict=True)) for row in rows]


def post(client: TestClient, path: str, body: object = None):
    return client.post(path, content=json.dumps(body if body is not None else {}), headers=JSON)


def stored_mask(row: dict) -> np.ndarray:
    return rle.decode({"size": [row["height"], row["width"]], "counts": row["segmentation"]})


def rasterised(shape: tuple[int, int], points: list[list[int]], radius: int) -> np.ndarray:
    """(H, W) bool: the pixels of a stroke as the page's contract defines them, drawn here with
    cv2 on the whole grid (the session draws in the stroke's bounding box)."""
    canvas = np.zeros(shape, np.uint8)
    polyline = np.asarray(points, np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [polyline], isClosed=False, color=1, thickness=2 * radius)
    return canvas.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


class FakeClock:
    """A monotonic clock the test sets by hand (seconds): working time without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def timed(store, model, clock):
    """A manual session on ``clock``, and its client."""
    with (
        AnnotationSession(store, 1, "manual", model, 7, WebAnnotator("tester"), clock=clock) as s,
        TestClient(create_app(s)) as client,
    ):
        yield s, client


# ------------------------------------------------------------------------------ session + API


def test_page_state_and_image(client, session):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    state = client.get("/api/next").json()
    first = sorted(session.images)[0]
    assert state["done"] is False and state["image"]["image_id"] == first
    assert (state["round"], state["stage"], state["total"]) == (1, "manual", 3)
    assert state["masks"] == [] and state["annotator"] == "web:tester"
    for image_id, row in session.images.items():  # every store image, on its stored grid
        response = client.get(f"/api/images/{image_id}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(response.content)) as image:
            assert image.size == (row.width, row.height)


@pytest.mark.parametrize(
    "path",
    [
        "/api/images/0123456789abcdef",
        "/api/images/..",
        "/api/images/%2e%2e",
        "/api/images/..%2F..%2Fpyproject.toml",
        "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/images/..%5C..%5Cpyproject.toml",
        "/api/images/%252e%252e%252fpyproject.toml",
        "/static/..%2F..%2Fpyproject.toml",
        "/engine/static/annotate.html",
        "/pyproject.toml",
    ],
)
def test_unknown_ids_and_traversal_are_404(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.text)
    assert "error" in response.json() and "[project]" not in response.text


def test_unknown_id_refused_on_every_endpoint(client):
    for action in ("predict", "accept", "undo", "delete", "clear", "next"):
        response = post(client, f"/api/images/0123456789abcdef/{action}", {})
        # predict validates its body first (422); the others find no such image (404)
        assert response.status_code in (404, 422), (action, response.text)
    response = post(client, "/api/images/0123456789abcdef/predict", {"points": [[1, 1, 1]]})
    assert response.status_code == 404 and "no image" in response.json()["error"]


def test_predict_accept_writes_a_shard_duckdb_reads(client, session, store):
    image_id = client.get("/api/next").json()["image"]["image_id"]
    x, y = object_point(store, image_id)
    predicted = post(client, f"/api/images/{image_id}/predict", {"points": [[x, y, 1]]}).json()
    assert len(predicted["masks"]) == 3 and len(predicted["scores"]) == 3
    mask = predicted["masks"][predicted["best"]]
    assert mask["size"] == [120, 160] and rle.decode(mask).shape == (120, 160)
    assert predicted["decode_ms"] > 0
    time.sleep(0.05)  # the object's seconds run from its first prediction to the accept
    # A second click refines the first mask (its logits fed back): one mask.
    refined = post(
        client,
        f"/api/images/{image_id}/predict",
        {
            "points": [[x, y, 1], [2, 2, 0]],
            "mask_input_from_previous": True,
            "previous_index": predicted["best"],
        },
    ).json()
    assert len(refined["masks"]) == 1
    state = post(client, f"/api/images/{image_id}/accept", {"mask": 0}).json()
    assert len(state["masks"]) == 1 and state["masks"][0]["source"] == "web:tester"
    assert state["image"]["image_id"] == image_id  # still on the image until "next"
    # Every accept is stored at once (the person keeps the image's claim until "next").
    assert [r["image_id"] for r in stored_masks(store)] == [image_id]
    post(client, f"/api/images/{image_id}/next")

    (row,) = stored_masks(store)
    assert row["image_id"] == image_id and row["source"] == "web:tester"
    assert row["clicks"] == [{"x": x, "y": y, "label": 1}, {"x": 2, "y": 2, "label": 0}]
    assert row["seconds"] >= 0.05 and row["area"] > 0 and row["model_version"] == 7
    assert row["predicted_iou"] == pytest.approx(refined["scores"][0], abs=1e-6)
    decoded = rle.decode({"size": [row["height"], row["width"]], "counts": row["segmentation"]})
    assert int(decoded.sum()) == row["area"]


def test_box_prompt_is_stored_as_corner_clicks(client, store):
    image_id = client.get("/api/next").json()["image"]["image_id"]
    predicted = post(client, f"/api/images/{image_id}/predict", {"box": [10, 12, 90, 80]}).json()
    assert len(predicted["masks"]) == 1  # a box is not ambiguous
    post(client, f"/api/images/{image_id}/accept", {})
    post(client, f"/api/images/{image_id}/next")
    (row,) = stored_masks(store)
    assert row["clicks"] == [{"x": 10, "y": 12, "label": 2}, {"x": 90, "y": 80, "label": 3}]


def test_undo_delete_next_and_round_row(client, session, store):
    ids = sorted(session.images)
    image_id = client.get("/api/next").json()["image"]["image_id"]
    x, y = object_point(store, image_id)
    for _ in range(2):
        post(client, f"/api/images/{image_id}/predict", {"points": [[x, y, 1]]})
        post(client, f"/api/images/{image_id}/accept", {})
    assert len(stored_masks(store)) == 2  # each accept, delete and undo rewrites the shard
    state = post(client, f"/api/images/{image_id}/delete", {"index": 0}).json()
    assert len(state["masks"]) == 1 and len(stored_masks(store)) == 1
    state = post(client, f"/api/images/{image_id}/undo").json()  # the delete comes back
    assert len(state["masks"]) == 2 and len(stored_masks(store)) == 2
    state = post(client, f"/api/images/{image_id}/undo").json()  # the second accept goes
    assert len(state["masks"]) == 1 and len(stored_masks(store)) == 1
    # An object drawn and left is abandoned, not stored.
    post(client, f"/api/images/{image_id}/predict", {"points": [[x, y, 1]]})
    state = post(client, f"/api/images/{image_id}/next").json()
    assert state["image"]["image_id"] == ids[1] and len(stored_masks(store)) == 1
    assert session.annotator.work(image_id).abandoned == 1
    # Out of turn: the finished image is no longer the open one.
    assert post(client, f"/api/images/{image_id}/accept").status_code == 409
    post(client, f"/api/images/{ids[1]}/next")  # finished with no masks: an empty shard
    state = post(client, f"/api/images/{ids[2]}/next").json()
    assert state["done"] is True
    with Catalog(store) as catalog:
        _, rounds = catalog.query("SELECT round, stage, images, masks FROM rounds WHERE round = 1")
    assert rounds == [(1, "manual", 3, 1)]  # images done, with masks or none; one mask
    assert all(session.writer.done(i) for i in ids)


def test_a_new_session_skips_done_images(store, model, client, session):
    first = client.get("/api/next").json()["image"]["image_id"]
    post(client, f"/api/images/{first}/predict", {"points": [[5, 5, 1]]})
    post(client, f"/api/images/{first}/accept")
    session.close()
    with AnnotationSession(store, 1, "manual", model) as again:
        assert again.state()["image"]["image_id"] == sorted(again.images)[1]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ("{not json", 400, "not valid JSON"),
        ('{"points": [[NaN, 3, 1]]}', 422, "NaN"),
        ('{"points": [[Infinity, 3, 1]]}', 422, "finite"),
        ("[1, 2]", 422, "JSON object"),
        ({}, 422, "no prompt"),
        ({"points": [[500, 3, 1]]}, 422, "point_coords"),
        ({"points": [[-1, 3, 1]]}, 422, "point_coords"),
        ({"points": [[3, 3, 2]]}, 422, "label"),
        ({"points": [[3, 3, True]]}, 422, "label"),
        ({"points": [[3, 3]]}, 422, "points[0]"),
        ({"points": [["3", 3, 1]]}, 422, "points[0]"),
        ({"points": "3,3"}, 422, "points"),
        ({"points": [[3, 3, 1]] * 65}, 422, "at most"),
        ({"box": [1, 2, 3]}, 422, "box"),
        ({"box": [50, 50, 10, 10]}, 422, "box"),
        ({"box": [0, 0, 1000, 10]}, 422, "box"),
        ({"points": [[3, 3, 1]], "colour": "red"}, 422, "unknown field"),
        ({"points": [[3, 3, 1]], "mask_input_from_previous": "yes"}, 422, "true or false"),
        ({"points": [[3, 3, 1]], "mask_input_from_previous": True}, 409, "no previous"),
    ],
)
def test_malformed_predict_is_4xx_with_a_message(client, body, status, words):
    image_id = client.get("/api/next").json()["image"]["image_id"]
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post(f"/api/images/{image_id}/predict", content=content, headers=JSON)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    # The page goes on working after any refusal.
    ok = post(client, f"/api/images/{image_id}/predict", {"points": [[3, 3, 1]]})
    assert ok.status_code == 200


def test_other_refusals(client, session):
    ids = sorted(session.images)
    image_id = client.get("/api/next").json()["image"]["image_id"]
    url = f"/api/images/{image_id}"
    assert client.post(f"{url}/predict", content="{}").status_code == 415  # not JSON
    assert client.post(f"{url}/predict", data={"points": "1"}).status_code == 415
    assert client.get(f"{url}/predict").status_code == 405
    assert post(client, f"{url}/accept").status_code == 409  # nothing predicted yet
    assert post(client, f"{url}/undo").status_code == 409
    assert post(client, f"{url}/delete", {"index": 0}).status_code == 422
    assert post(client, f"{url}/delete", {}).status_code == 422
    assert post(client, f"{url}/delete", {"index": "0"}).status_code == 422
    post(client, f"{url}/predict", {"points": [[3, 3, 1]]})
    assert post(client, f"{url}/accept", {"mask": 3}).status_code == 422
    assert post(client, f"{url}/accept", {"mask": 1.5}).status_code == 422
    # Another store image exists but is not the one being annotated.
    other = post(client, f"/api/images/{ids[1]}/predict", {"points": [[3, 3, 1]]})
    assert other.status_code == 409 and ids[0] in other.json()["error"]
    big = post(client, f"{url}/predict", {"points": [[3, 3, 1]], "pad": "x" * 70_000})
    assert big.status_code == 413


# -------------------------------------------------------------------- correction and time


def test_brush_and_eraser_change_exactly_their_pixels(timed, store, clock):
    session, client = timed
    image_id = client.get("/api/next").json()["image"]["image_id"]  # opened at t = 0
    url = f"/api/images/{image_id}"
    shape = (120, 160)
    x, y = object_point(store, image_id)
    clock.now = 2.0
    predicted = post(client, f"{url}/predict", {"points": [[x, y, 1]]}).json()
    model_masks = [rle.decode(m) for m in predicted["masks"]]
    brush = [[5, 5], [60, 30], [100, 30], [159, 119]]  # to the image's last pixel
    clock.now = 5.0
    painted = post(client, f"{url}/stroke", {"mode": "brush", "radius": 3, "points": brush})
    assert painted.status_code == 200, painted.text
    painted = painted.json()
    brushed = rasterised(shape, brush, 3)
    assert len(painted["masks"]) == 3  # the strokes apply to each ambiguous mask
    for got, base in zip(painted["masks"], model_masks, strict=True):
        assert np.array_equal(rle.decode(got), base | brushed)
    assert painted["strokes"] == 1 and painted["clicks"] == [[x, y, 1]]
    eraser = [[50, 15], [50, 45]]  # crosses the brush stroke
    erased_pixels = rasterised(shape, eraser, 4)
    assert (brushed & erased_pixels).any() and (brushed & ~erased_pixels).any()
    clock.now = 9.0
    erased = post(client, f"{url}/stroke", {"mode": "eraser", "radius": 4, "points": eraser})
    erased = erased.json()
    for got, base in zip(erased["masks"], model_masks, strict=True):
        assert np.array_equal(rle.decode(got), (base | brushed) & ~erased_pixels)
    assert (erased["strokes"], erased["stroke_seconds"], erased["seconds"]) == (2, 7.0, 9.0)

    clock.now = 10.5
    state = post(client, f"{url}/accept", {"mask": 1, "category": " apple "}).json()
    assert state["object"] is None and state["masks"][0]["strokes"] == 2
    post(client, f"{url}/next")
    (row,) = stored_masks(store)
    expected = (model_masks[1] | brushed) & ~erased_pixels
    assert np.array_equal(stored_mask(row), expected)
    assert row["strokes"] == 2 and row["clicks"] == [{"x": x, "y": y, "label": 1}]
    assert row["seconds"] == pytest.approx(2 + 3 + 4 + 1.5)
    assert row["stroke_seconds"] == pytest.approx(3 + 4)
    assert row["model_iou"] == pytest.approx(iou(model_masks[1], expected), abs=1e-6)
    assert row["model_iou"] < 1
    assert row["predicted_iou"] == pytest.approx(predicted["scores"][1], abs=1e-6)
    # A category the store has not seen gets the next free id (ground truth's "object" is 1).
    assert (row["category"], row["category_id"]) == ("apple", 2)
    assert state["categories"] == ["apple", "object"]


def test_a_click_after_strokes_paints_them_again_and_undo_goes_back_in_order(timed, store):
    session, client = timed
    image_id = client.get("/api/next").json()["image"]["image_id"]
    url = f"/api/images/{image_id}"
    x, y = object_point(store, image_id)
    first = post(client, f"{url}/predict", {"points": [[x, y, 1]]}).json()
    brush = [[10, 100], [40, 110]]
    brushed = rasterised((120, 160), brush, 5)
    stroked = post(client, f"{url}/stroke", {"mode": "brush", "radius": 5, "points": brush})
    stroked = stroked.json()
    body = {
        "points": [[x, y, 1], [150, 5, 0]],
        "mask_input_from_previous": True,
        "previous_index": first["best"],
    }
    second = post(client, f"{url}/predict", body).json()
    assert len(second["masks"]) == 1 and second["strokes"] == 1  # not silently dropped
    assert (rle.decode(second["masks"][0]) >= brushed).all()

    state = post(client, f"{url}/undo").json()  # the second click: the stroked masks are back
    assert state["object"]["masks"] == stroked["masks"]
    assert state["object"]["clicks"] == [[x, y, 1]] and state["object"]["refinable"] is True
    state = post(client, f"{url}/undo").json()  # the stroke
    assert state["object"]["masks"] == first["masks"] and state["object"]["strokes"] == 0
    # The restored prediction's logits are fed back: the same click gives the same mask.
    again = post(client, f"{url}/predict", body).json()
    assert np.array_equal(rle.decode(again["masks"][0]) | brushed, rle.decode(second["masks"][0]))
    post(client, f"{url}/undo")
    state = post(client, f"{url}/undo").json()  # the first click: nothing drawn
    assert state["object"] is None and state["can_undo"] is False
    assert post(client, f"{url}/undo").status_code == 409
    assert stored_masks(store) == []


def test_seconds_are_working_time_with_idle_gaps_capped(timed, store, clock):
    session, client = timed
    assert IDLE_CAP_S == 10.0
    image_id = client.get("/api/next").json()["image"]["image_id"]  # opened at t = 0
    url = f"/api/images/{image_id}"
    x, y = object_point(store, image_id)
    clock.now = 4.0
    post(client, f"{url}/predict", {"points": [[x, y, 1]]})
    clock.now = 154.0  # one click, then away for 150 s: counts as the cap
    post(client, f"{url}/accept")
    # An object dropped: its time is abandoned time.
    clock.now = 1000.0
    post(client, f"{url}/predict", {"points": [[x, y, 1]]})
    clock.now = 1001.5
    post(client, f"{url}/clear")
    work = session.annotator.work(image_id)
    assert (work.abandoned, work.abandoned_clicks) == (1, 1)
    assert work.abandoned_seconds == pytest.approx(IDLE_CAP_S + 1.5)
    # An object painted by hand: no clicks, no model mask (model_iou unknown).
    clock.now = 1003.0
    square = [[20, 20], [20, 40], [40, 40], [40, 20], [20, 20]]
    post(client, f"{url}/stroke", {"mode": "brush", "radius": 2, "points": square})
    clock.now = 1005.0
    state = post(client, f"{url}/accept").json()
    assert len(state["masks"]) == 2
    post(client, f"{url}/next")
    (row,) = [r for r in stored_masks(store) if r["clicks"] != []]
    assert row["seconds"] == pytest.approx(4 + IDLE_CAP_S)
    assert (row["strokes"], row["stroke_seconds"], row["model_iou"]) == (0, 0.0, 1.0)
    (row,) = [r for r in stored_masks(store) if r["clicks"] == []]
    assert np.array_equal(stored_mask(row), rasterised((120, 160), square, 2))
    assert row["predicted_iou"] is None and row["model_iou"] is None
    assert row["seconds"] == pytest.approx(3.5) and row["stroke_seconds"] == pytest.approx(1.5)
    assert row["strokes"] == 1


def test_categories_come_from_the_store_and_from_what_was_typed(store, model, timed):
    session, client = timed
    assert categories(store) == {"object": 1}  # ground truth's
    state = client.get("/api/next").json()
    assert state["categories"] == ["object"]
    image_id = state["image"]["image_id"]
    url = f"/api/images/{image_id}"
    for category in ("object", "nut", None):
        post(client, f"{url}/predict", {"points": [[30, 30, 1]]})
        state = post(client, f"{url}/accept", {"category": category}).json()
    assert [m["category"] for m in state["masks"]] == ["object", "nut", None]
    post(client, f"{url}/next")
    stored = {(r["category"], r["category_id"]) for r in stored_masks(store)}
    assert stored == {("object", 1), ("nut", 2), (None, None)}
    assert categories(store) == {"nut": 2, "object": 1}
    session.close()
    with AnnotationSession(store, 1, "manual", model) as again:
        assert again.state()["categories"] == ["nut", "object"]


def test_editing_a_prefilled_mask_stores_a_corrected_mask(store, model, clock):
    loose = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    with AnnotationSession(
        store, 2, "semi", model, 3, generator_options=loose, clock=clock
    ) as session:
        client = TestClient(create_app(session))
        state = client.get("/api/next").json()
        image_id, prefill = state["image"]["image_id"], state["masks"]
        url = f"/api/images/{image_id}"
        assert prefill and {m["source"] for m in prefill} == {"model"}
        original = rle.decode(prefill[0]["mask"])
        # Esc puts an edited mask back unchanged.
        post(client, f"{url}/edit", {"index": 0})
        post(client, f"{url}/stroke", {"mode": "brush", "radius": 9, "points": [[3, 3]]})
        state = post(client, f"{url}/clear").json()
        assert [m["mask"] for m in state["masks"]] == [m["mask"] for m in prefill]
        assert session.annotator.work(image_id).abandoned == 0

        clock.now = 1.0
        state = post(client, f"{url}/edit", {"index": 0}).json()
        assert len(state["masks"]) == len(prefill) - 1
        assert state["object"]["editing"] == "model" and state["object"]["clicks"] == []
        assert np.array_equal(rle.decode(state["object"]["masks"][0]), original)
        assert post(client, f"{url}/edit", {"index": 0}).status_code == 409  # one at a time
        assert post(client, f"{url}/delete", {"index": 0}).status_code == 409
        ys, xs = np.nonzero(original)
        eraser = [[int(xs[0]), int(ys[0])], [int(xs[-1]), int(ys[-1])]]
        clock.now = 3.0
        post(client, f"{url}/stroke", {"mode": "eraser", "radius": 2, "points": eraser})
        clock.now = 4.0
        state = post(client, f"{url}/accept", {"category": "nut"}).json()
        corrected = original & ~rasterised(original.shape, eraser, 2)
        assert corrected.sum() < original.sum()
        assert [m["source"] for m in state["masks"]][-1] == "web:web"
        assert session.annotator.work(image_id).prefill_corrected == 1

        post(client, f"{url}/undo")  # the accept
        state = post(client, f"{url}/undo").json()  # the edit: the pre-filled mask is back
        assert [m["mask"] for m in state["masks"]] == [m["mask"] for m in prefill]
        assert session.annotator.work(image_id).prefill_corrected == 0
        post(client, f"{url}/delete", {"index": 0})
        assert session.annotator.work(image_id).prefill_deleted == 1
        post(client, f"{url}/undo")
        assert session.annotator.work(image_id).prefill_deleted == 0

        # Corrected again (the same times), and the image finished: its shard has the
        # corrected mask in place of the pre-filled one.
        clock.now = 5.0
        post(client, f"{url}/edit", {"index": 0})
        clock.now = 7.0
        post(client, f"{url}/stroke", {"mode": "eraser", "radius": 2, "points": eraser})
        clock.now = 8.0
        post(client, f"{url}/accept", {"category": "nut"})
        post(client, f"{url}/next")
        rows = stored_masks(store, 2, "semi")
        (web,) = [r for r in rows if r["source"] == "web:web"]
        assert np.array_equal(stored_mask(web), corrected)
        assert web["clicks"] == [] and web["strokes"] == 1 and web["category"] == "nut"
        assert web["model_iou"] == pytest.approx(iou(original, corrected), abs=1e-6)
        assert web["seconds"] == pytest.approx(4.0) and web["stroke_seconds"] == pytest.approx(2)
        assert len(rows) == len(prefill)


def test_editing_a_persons_mask_keeps_its_place_clicks_and_time(timed, store, clock):
    session, client = timed
    ids = sorted(session.images)
    client.get("/api/next")  # opened at t = 0
    url = f"/api/images/{ids[0]}"
    x, y = object_point(store, ids[0])
    model_masks = []
    for point in ([x, y, 1], [5, 5, 1]):
        clock.now += 1.0
        predicted = post(client, f"{url}/predict", {"points": [point]}).json()
        model_masks.append(rle.decode(predicted["masks"][0]))
        clock.now += 1.0
        post(client, f"{url}/stroke", {"mode": "brush", "radius": 2, "points": [[80, 60]]})
        clock.now += 1.0
        state = post(client, f"{url}/accept", {"mask": 0, "category": "nut"}).json()
    first = rle.decode(state["masks"][0]["mask"])
    assert state["masks"][0]["seconds"] == pytest.approx(3.0)
    clock.now += 1.0
    state = post(client, f"{url}/edit", {"index": 0}).json()
    assert state["object"]["editing"] == "web" and state["object"]["clicks"] == [[x, y, 1]]
    assert len(state["masks"]) == 1
    clock.now += 2.0
    erased = [[80, 60]]
    post(client, f"{url}/stroke", {"mode": "eraser", "radius": 1, "points": erased})
    clock.now += 1.0
    state = post(client, f"{url}/accept").json()  # no category given: the mask keeps its own
    edited = first & ~rasterised(first.shape, erased, 1)
    assert np.array_equal(rle.decode(state["masks"][0]["mask"]), edited)  # in its place
    # "Next image" while a mask is edited puts it back unchanged before the shard is written.
    post(client, f"{url}/edit", {"index": 1})
    post(client, f"{url}/stroke", {"mode": "eraser", "radius": 50, "points": [[80, 60]]})
    second = state["masks"][1]["mask"]
    post(client, f"{url}/next")
    rows = stored_masks(store)
    assert len(rows) == 2 and second["counts"] in {r["segmentation"] for r in rows}
    (row,) = [r for r in rows if r["clicks"][0]["x"] == x]
    assert row["strokes"] == 2 and row["seconds"] == pytest.approx(3.0 + 4.0)
    assert row["stroke_seconds"] == pytest.approx(1.0 + 2.0) and row["category"] == "nut"
    assert row["clicks"] == [{"x": x, "y": y, "label": 1}]
    # model_iou still compares with the model's mask, before both edits' strokes.
    assert row["model_iou"] == pytest.approx(iou(model_masks[0], edited), abs=1e-6)
    assert session.annotator.work(ids[0]).abandoned == 0


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"mode": "pen", "radius": 3, "points": [[1, 1]]}, "mode"),
        ({"mode": "brush", "radius": 0, "points": [[1, 1]]}, "radius"),
        ({"mode": "brush", "radius": MAX_RADIUS + 1, "points": [[1, 1]]}, "radius"),
        ({"mode": "brush", "radius": 2.5, "points": [[1, 1]]}, "radius"),
        ({"mode": "brush", "radius": True, "points": [[1, 1]]}, "radius"),
        ({"mode": "brush", "radius": 3, "points": []}, "non-empty"),
        ({"mode": "brush", "radius": 3, "points": "1,1"}, "non-empty"),
        ({"mode": "brush", "radius": 3, "points": [[160, 5]]}, "outside the image"),
        ({"mode": "brush", "radius": 3, "points": [[5, 120]]}, "outside the image"),
        ({"mode": "brush", "radius": 3, "points": [[1, 1], [-1, 5]]}, "points[1]"),
        ({"mode": "brush", "radius": 3, "points": [[1.5, 5]]}, "integer"),
        ({"mode": "brush", "radius": 3, "points": [[1, 2, 3]]}, "points[0]"),
        ({"mode": "brush", "radius": 3, "points": [[1, 1]] * (MAX_STROKE_POINTS + 1)}, "at most"),
        ('{"mode": "brush", "radius": 3, "points": [[NaN, 1]]}', "NaN"),
        ({"mode": "brush", "radius": 3}, "required"),
        ({"mode": "brush", "radius": 3, "points": [[1, 1]], "colour": 1}, "unknown field"),
    ],
)
def test_malformed_strokes_are_422_and_paint_nothing(client, session, body, words):
    image_id = client.get("/api/next").json()["image"]["image_id"]
    url = f"/api/images/{image_id}"
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post(f"{url}/stroke", content=content, headers=JSON)
    assert response.status_code == 422, response.text
    assert words in response.json()["error"]
    assert client.get("/api/next").json()["object"] is None
    ok = post(client, f"{url}/stroke", {"mode": "eraser", "radius": 1, "points": [[0, 0]]})
    assert ok.status_code == 200 and ok.json()["strokes"] == 1


def test_stroke_and_category_refusals(client, session):
    ids = sorted(session.images)
    url = f"/api/images/{ids[0]}"
    other = post(
        client, f"/api/images/{ids[1]}/stroke", {"mode": "brush", "radius": 2, "points": [[1, 1]]}
    )
    assert other.status_code == 409 and ids[0] in other.json()["error"]
    # An eraser stroke on nothing leaves an empty mask: nothing to accept.
    post(client, f"{url}/stroke", {"mode": "eraser", "radius": 2, "points": [[1, 1]]})
    assert post(client, f"{url}/accept").status_code == 422
    assert post(client, f"{url}/edit", {"index": 0}).status_code == 409  # drawing already
    post(client, f"{url}/clear")
    assert post(client, f"{url}/edit", {"index": 0}).status_code == 422  # no masks yet
    post(client, f"{url}/predict", {"points": [[3, 3, 1]]})
    for category in ["", "   ", 5, "x" * 65, "a\nb", ["nut"]]:
        response = post(client, f"{url}/accept", {"category": category})
        assert response.status_code == 422 and "category" in response.json()["error"]
    assert post(client, f"{url}/accept", {"category": "nut"}).status_code == 200


def test_semi_stage_prefills_model_masks(store, model):
    loose = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    with AnnotationSession(store, 2, "semi", model, 3, generator_options=loose) as session:
        client = TestClient(create_app(session))
        state = client.get("/api/next").json()
        assert state["masks"] and {m["source"] for m in state["masks"]} == {"model"}
        image_id = state["image"]["image_id"]
        post(client, f"/api/images/{image_id}/predict", {"points": [[30, 30, 1]]})
        post(client, f"/api/images/{image_id}/accept")
        post(client, f"/api/images/{image_id}/next")
    rows = stored_masks(store, 2, "semi")
    sources = [r["source"] for r in rows]
    assert sources.count("web:web") == 1 and sources.count("model") == len(state["masks"])
    assert all(r["clicks"] is None for r in rows if r["source"] == "model")


@pytest.mark.skipif(not has_default(), reason="this build ships no default model")
def test_semi_stage_prefills_with_the_shipped_models_own_presets(tmp_path, scenes):
    """With no options the pre-fill uses the model's ``semi`` preset (stored with its weights):
    the shipped model pre-fills masks, which SAM's 0.92 / 0.97 would not."""
    store = make_store(tmp_path / "store", scenes)
    model, version, _ = resolve_model(store, 1)
    assert version is None  # no stored model: the shipped default
    semi = model.metadata["generator_presets"]["semi"]
    with AnnotationSession(store, 1, "semi", model) as session:
        assert session.generator.pred_iou_thresh == semi["pred_iou_thresh"]
        assert session.generator.stability_score_thresh == semi["stability_score_thresh"]
        state = session.state()
        assert len(state["masks"]) >= 1
        assert {m["source"] for m in state["masks"]} == {"model"}
        assert min(m["predicted_iou"] for m in state["masks"]) > semi["pred_iou_thresh"]


def test_the_page_uses_the_newest_promoted_model_as_the_stages_do(tmp_path, scenes, model):
    """A retrained version that was not promoted is stored but used by no round: the page
    prompts the version the stages would use."""
    store = make_store(tmp_path / "store", scenes)
    store.write_model(1, model_bytes(model, {}), {"round": 0, "metrics": {}})
    store.write_model(2, model_bytes(model, {}), {"round": 1, "promoted": False, "metrics": {}})
    assert resolve_model(store, 2)[1] == 1
    store.write_model(3, model_bytes(model, {}), {"round": 2, "promoted": True, "metrics": {}})
    assert resolve_model(store, 3)[1] == 3
    assert resolve_model(store, 1)[1] == 1


def test_serve_does_not_import_ray(tmp_path):
    """The annotation page runs without Ray: importing the command and the page must not."""
    code = (
        "import sys\n"
        "import maskmill.flows.cli_serve, maskmill.engine.web.app, maskmill.engine.web.session\n"
        "from maskmill.flows.cli import build_parser\n"
        "build_parser().parse_args(['serve', '--store', 'x'])\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_a_second_session_on_the_round_gets_another_image(store, model, session):
    """Two servers on one round and stage (a round-wide lease refused the second before): each
    person's image is claimed, so the second gets the next one."""
    first = session.state()["image"]["image_id"]
    with AnnotationSession(store, 1, "manual", model, None, WebAnnotator("other")) as other:
        second = other.state()["image"]["image_id"]
        assert second == sorted(session.images)[1]
        other.next_image(second)  # finished with no masks: done
    session.close()  # nothing accepted on the first image: it goes back to the queue
    with AnnotationSession(store, 1, "manual", model) as again:
        assert again.state()["image"]["image_id"] == first
        again.next_image(first)
        assert again.state()["image"]["image_id"] == sorted(session.images)[2]


def test_default_round_and_model(store, tmp_path, model):
    assert default_round(store, "manual") == 1  # ground truth only
    with AnnotationSession(store, 1, "manual", model) as session:
        image_id = session.state()["image"]["image_id"]
        session.predict(image_id, [[5, 5, 1]])
        session.accept(image_id)
    assert default_round(store, "manual") == 1  # started, not finished
    assert default_round(store, "semi") == 2
    if not has_default():
        with pytest.raises(FileNotFoundError, match="--checkpoint"):
            resolve_model(store, 1)
    path = tmp_path / "tiny.pt"
    save_checkpoint(model, str(path))
    assert resolve_model(store, 1, str(path))[1] is None
    store.write_model(1, model_bytes(model, {"round": 0}), {"round": 0})
    store.write_model(2, model_bytes(model, {"round": 1}), {"round": 1})
    assert resolve_model(store, 1)[1] == 1  # the newest trained before round 1
    assert resolve_model(store, 2)[1] == 2


def column_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO run lengths of a mask (column-major, from background)."""
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *counts] if flat[0] else counts


def test_cli(tmp_path, capsys):
    args = build_parser().parse_args(["serve", "--store", "s", "--stage", "semi", "--port", "9"])
    assert (args.stage, args.port, args.host, args.round) == ("semi", 9, "127.0.0.1", None)
    empty = tmp_path / "empty"
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(build_model("tiny", seed=0), str(checkpoint))
    assert main(["serve", "--store", str(empty), "--checkpoint", str(checkpoint)]) == 2
    assert capsys.readouterr().err == (
        f"maskmill serve: {empty}: no store there (the path does not exist)\n"
    )
    assert not empty.exists()  # a typo is not made a store
    (empty / "images").mkdir(parents=True)  # a store, with no images yet
    assert main(["serve", "--store", str(empty), "--checkpoint", str(checkpoint)]) == 2
    assert capsys.readouterr().err == f"maskmill serve: {empty} has no images; import some first\n"
    assert main(["serve", "--store", str(empty), "--checkpoint", str(tmp_path / "no.pt")]) == 2
    missing = tmp_path / "no.pt"
    assert capsys.readouterr().err == f"maskmill serve: {missing}: no such checkpoint file\n"
    with pytest.raises(SystemExit):  # argparse: auto is not a stage people annotate
        main(["serve", "--store", str(empty), "--stage", "auto"])


# -------------------------------------------------------------------------- the real server


@contextlib.contextmanager
def live_server(session: AnnotationSession):
    """The app on uvicorn, in a thread, on a free port of 127.0.0.1; yields its base URL."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(session, allowed_hosts=["127.0.0.1", "localhost"])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def raw_get(base: str, path: str, host: str | None = None) -> tuple[int, str]:
    """GET ``path`` exactly as written (http.client does not normalise ``..``)."""
    address = base.removeprefix("http://")
    connection = http.client.HTTPConnection(address, timeout=30)
    try:
        connection.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def test_live_server_refuses_traversal(session):
    with live_server(session) as base:
        assert raw_get(base, "/")[0] == 200
        for path in [
            "/../pyproject.toml",
            "/api/images/../../pyproject.toml",
            "/api/images/../../../../etc/passwd",
            "/api/images/%2e%2e/%2e%2e/pyproject.toml",
            "/api/images/..%2f..%2fpyproject.toml",
            "/api/images//etc/passwd",
        ]:
            status, text = raw_get(base, path)
            assert status in (400, 404), (path, status)
            assert "[project]" not in text and "root:" not in text
        # DNS rebinding: a page served under another host name gets nothing.
        assert raw_get(base, "/api/next", host="evil.example")[0] == 400


# ---------------------------------------------------------------------------- in Chromium


def _install_chromium() -> str | None:
    """``apt-get install chromium`` (after ``apt-get update`` if the first try fails), as root;
    None when it was installed, else why it could not be."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "installing it needs root (apt-get); run `sudo apt-get install -y chromium`"
    if not shutil.which("apt-get"):
        return "there is no apt-get here to install it; install Chromium at that path"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "chromium"]
    if subprocess.run(install, env=env, capture_output=True, timeout=1200).returncode == 0:
        return None
    subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode == 0:
        return None
    return f"`apt-get install -y chromium` failed: {done.stderr.strip().splitlines()[-1:]}"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium for Playwright (installed here if missing). Where it cannot be had the
    browser tests are skipped with the reason; under CI (``CI`` set, a root machine with
    apt-get) they fail instead, so a CI run cannot pass without the browser checks."""
    problem = None
    if not os.path.exists(CHROMIUM):
        reason = _install_chromium()
        if not os.path.exists(CHROMIUM):
            problem = f"browser tests need {CHROMIUM}: {reason or 'still missing after apt-get'}"
    if problem is None:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is not installed (pip install -e '.[test]')"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return CHROMIUM


def client_point(page, x: int, y: int) -> tuple[float, float]:
    """Client (CSS) coordinates of the centre of image pixel (x, y), through the page's view."""
    return tuple(page.evaluate("([x, y]) => window.maskmill.toClient(x, y)", [x, y]))


def open_page(playwright, chromium: str, profile: Path, base: str):
    """(Chromium context, its page on the annotation page, ready, the page's errors so far)."""
    context = playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=chromium,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 860, "height": 420},
        device_scale_factor=1,
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base}/")
    page.wait_for_selector('body[data-state="ready"]', timeout=60_000)
    return context, page, errors


@pytest.fixture()
def page_store(tmp_path_factory) -> Store:
    """A store of larger scenes, so the screenshot shows something."""
    folder = tmp_path_factory.mktemp("page-scenes")
    annotations = write_coco(folder, 2, seed=4, height=360, width=480, parts=False)
    return make_store(
        tmp_path_factory.mktemp("page") / "store", (str(folder / "images"), str(annotations))
    )


def test_page_in_chromium(chromium, page_store, model, tmp_path):
    from playwright.sync_api import sync_playwright

    store = page_store
    # The shipped model when the build has one (what `maskmill serve` falls back to; its masks
    # make a meaningful screenshot), else random tiny weights from a checkpoint file.
    checkpoint = None
    if not has_default():
        checkpoint = str(tmp_path / "tiny.pt")
        save_checkpoint(model, checkpoint)
    sam, version, _ = resolve_model(store, 1, checkpoint)
    with (
        AnnotationSession(store, 1, "manual", sam, version, WebAnnotator("e2e")) as session,
        live_server(session) as base,
        sync_playwright() as playwright,
    ):
        image_id = session.state()["image"]["image_id"]
        objects = sorted(ground_truth(store)[image_id], key=lambda o: -int(rle.areas([o])[0]))
        first = [int(v) for v in interior_point(rle.decode(objects[0]))]
        second = [int(v) for v in interior_point(rle.decode(objects[1]))]
        context, page, errors = open_page(playwright, chromium, tmp_path / "profile", base)
        try:
            # Fitted: the 480 x 360 image fits the window, so it is shown at 1:1.
            assert page.evaluate("window.maskmill.view()")["scale"] == 1

            def click(x: int, y: int, button: str = "left") -> None:
                page.mouse.click(*client_point(page, x, y), button=button)

            click(*first)
            page.wait_for_selector('body[data-predictions="1"]', timeout=30_000)
            shown = page.locator("#mask-index").inner_text()  # "k/3": the best mask first
            assert shown.endswith("/3")
            page.keyboard.press("Tab")  # cycles the ambiguous masks
            assert page.locator("#mask-index").inner_text() == f"{int(shown[0]) % 3 + 1}/3"
            page.keyboard.press("Tab")
            page.keyboard.press("Tab")
            assert page.locator("#mask-index").inner_text() == shown
            page.keyboard.press("Enter")
            page.wait_for_selector('body[data-masks="1"]', timeout=30_000)

            # A second object: a foreground and a background click, left on screen.
            click(*second)
            page.wait_for_selector('body[data-predictions="2"]', timeout=30_000)
            click(5, 5, button="right")
            page.wait_for_selector('body[data-predictions="3"]', timeout=30_000)
            assert page.locator("#clicks").inner_text() == "2"
            # The page's decoder of COCO compressed RLE agrees with pycocotools.
            rng = np.random.default_rng(0)
            for mask in [
                rng.random((37, 53)) > 0.5,
                np.ones((5, 4), bool),
                np.pad(np.ones((900, 1400), bool), ((300, 3), (3, 2000))),
            ]:
                counts = rle.encode(mask)["counts"]
                decoded = page.evaluate("s => window.maskmill.cocoCounts(s)", counts)
                assert decoded == column_runs(mask)
            shot = tmp_path / "annotation_page.png"
            page.screenshot(path=str(shot))
            if os.environ.get("MASKMILL_SCREENSHOT") == "1":
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, SCREENSHOT)
            assert not errors, errors
        finally:
            context.close()

    # The accepted mask, read straight from the store's Parquet files by DuckDB.
    glob = f"{store.root}/masks/round=1/stage=manual/*.parquet"
    rows = duckdb.sql(
        f"SELECT image_id, source, area, clicks, seconds FROM read_parquet('{glob}', "
        "hive_partitioning = true)"
    ).fetchall()
    assert len(rows) == 1
    stored_id, source, area, clicks, seconds = rows[0]
    assert (stored_id, source) == (image_id, "web:e2e")
    assert area > 0 and seconds > 0
    assert clicks == [{"x": first[0], "y": first[1], "label": 1}]


def test_brush_and_eraser_by_mouse_in_chromium(chromium, page_store, model, tmp_path):
    """A brush stroke and an eraser stroke made with the mouse (the eraser after zooming in)
    change the stored mask at exactly the pixels cv2 rasterises for the same polylines."""
    from playwright.sync_api import sync_playwright

    store = page_store
    with (
        AnnotationSession(store, 1, "manual", model, None, WebAnnotator("e2e")) as session,
        live_server(session) as base,
        sync_playwright() as playwright,
    ):
        image_id = session.state()["image"]["image_id"]
        height, width = session.images[image_id].height, session.images[image_id].width
        context, page, errors = open_page(playwright, chromium, tmp_path / "profile", base)
        try:

            def drag(points: list[list[int]], button: str = "left") -> None:
                # One mouse event per vertex: the page's polyline is exactly these pixels.
                page.mouse.move(*client_point(page, *points[0]))
                page.mouse.down(button=button)
                for point in points[1:]:
                    page.mouse.move(*client_point(page, *point))
                page.mouse.up(button=button)

            def settled() -> None:
                page.wait_for_selector('body[data-busy="0"]', timeout=30_000)

            page.mouse.click(*client_point(page, 240, 180))
            page.wait_for_selector('body[data-predictions="1"]', timeout=30_000)
            settled()
            with urllib.request.urlopen(f"{base}/api/next", timeout=30) as response:
                drawn = json.load(response)["object"]
            model_mask = rle.decode(drawn["masks"][drawn["best"]])

            page.keyboard.press("b")
            page.keyboard.press("[")  # 8 px -> 6 px
            assert page.locator("#radius-value").inner_text() == "6"
            brush = [[40, 40], [120, 60], [200, 50], [260, 120]]
            drag(brush)
            page.wait_for_selector('body[data-strokes="1"]', timeout=30_000)

            # Zoom in about a pixel near the eraser's path; the pen works in image pixels.
            page.mouse.move(*client_point(page, 110, 55))
            page.mouse.wheel(0, -300)
            page.wait_for_function("window.maskmill.view().scale > 1.5")
            page.keyboard.press("e")
            page.keyboard.press("]")  # 6 px -> 8 px (x 1.25, rounded)
            assert page.locator("#radius-value").inner_text() == "8"
            eraser = [[70, 30], [100, 70], [150, 45]]
            drag(eraser)
            page.wait_for_selector('body[data-strokes="2"]', timeout=30_000)
            page.keyboard.press("f")
            assert page.evaluate("window.maskmill.view()")["scale"] == 1
            page.keyboard.press("c")  # type a category; Enter accepts
            page.keyboard.type("walnut")
            page.keyboard.press("Enter")
            page.wait_for_selector('body[data-masks="1"]', timeout=30_000)
            settled()
            assert not errors, errors
        finally:
            context.close()

    brushed = rasterised((height, width), brush, 6)
    erased = rasterised((height, width), eraser, 8)
    assert (brushed & ~model_mask).any() and (erased & (model_mask | brushed)).any()
    expected = (model_mask | brushed) & ~erased
    (row,) = stored_masks(store)
    assert np.array_equal(stored_mask(row), expected)
    assert row["strokes"] == 2 and row["category"] == "walnut"
    assert row["model_iou"] == pytest.approx(iou(model_mask, expected), abs=1e-6)
    assert 0 < row["stroke_seconds"] <= row["seconds"]


# --------------------------------------------------------------- request bodies at the edges


def test_deeply_nested_json_is_400(client):
    """60 KB of ``[`` (under the body limit) once ended in a 500 (RecursionError)."""
    image_id = client.get("/api/next").json()["image"]["image_id"]
    url = f"/api/images/{image_id}/predict"
    for nested in ("[" * 60_000, '{"a": ' * 10_000):
        response = client.post(url, content=nested, headers=JSON)
        assert response.status_code == 400, response.text
        assert response.json() == {"error": "request body is not valid JSON: nested too deeply"}
    assert post(client, url, {"points": [[3, 3, 1]]}).status_code == 200


def test_previous_index_is_checked_without_mask_input(client):
    """``previous_index`` was ignored, whatever its value, unless ``mask_input_from_previous``."""
    image_id = client.get("/api/next").json()["image"]["image_id"]
    url = f"/api/images/{image_id}/predict"
    for index in (-1, 0):
        response = post(client, url, {"points": [[3, 3, 1]], "previous_index": index})
        assert response.status_code == 422, response.text[:200]
        assert response.json() == {
            "error": f"previous_index {index} needs mask_input_from_previous: true "
            "(send null otherwise)"
        }
    assert post(client, url, {"points": [[3, 3, 1]], "previous_index": None}).status_code == 200
    refine = {"points": [[3, 3, 1]], "mask_input_from_previous": True, "previous_index": -1}
    response = post(client, url, refine)
    assert response.status_code == 422 and "previous_index -1 is out of range" in response.text


def _post_raw(base: str, path: str, headers: list[str], body) -> tuple[bytes, int]:
    """POST over a socket, sending ``body`` (an iterator of byte chunks) only while no answer
    has come; returns (the answer's bytes, the body bytes sent before it came)."""
    host, port = base.removeprefix("http://").split(":")
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(head + headers) + "\r\n\r\n").encode())
        sent, pending = 0, b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1)
            if readable:
                break  # the answer came (or the server closed)
            if not writable:
                continue
            if not pending:
                pending = next(body, b"")
                if not pending:
                    break  # all sent; wait for the answer
            try:
                count = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += count
            pending = pending[count:]
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return answer, sent


def test_body_limit_is_enforced_before_and_while_reading(session):
    """The 64 KiB limit was checked after the whole body was read: a huge declared length
    waited for its bytes, a huge chunked body was read whole before its 413."""
    image_id = sorted(session.images)[0]
    path = f"/api/images/{image_id}/predict"
    too_big = b'{"error":"request body over 65536 bytes"}'
    with live_server(session) as base:
        started = time.monotonic()
        answer, _ = _post_raw(base, path, ["Content-Length: 1000000000"], iter([b"{}"]))
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert answer.endswith(too_big)
        assert time.monotonic() - started < 10  # not waiting for a gigabyte
        # The connection is closed, not kept for the rest of the body to be drained.
        assert b"\r\nconnection: close\r\n" in answer.lower()

        total = 256 * 2**20
        chunk = b"[" + b" " * (2**16 - 2) + b"]"  # 64 KiB of (not yet) JSON per chunk
        framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        body = (framed for _ in range(total // len(chunk)))
        answer, sent = _post_raw(base, path, ["Transfer-Encoding: chunked"], body)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert answer.endswith(too_big)
        assert sent < 32 * 2**20  # what socket buffers hold, not the 256 MiB offered
        # A body under the limit is still read whole, in chunks as in one piece.
        small = json.dumps({"points": [[3, 3, 1]]}).encode()
        framed = f"{len(small):x}\r\n".encode() + small + b"\r\n0\r\n\r\n"
        headers = ["Transfer-Encoding: chunked", "Connection: close"]
        answer, _ = _post_raw(base, path, headers, iter([framed]))
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]

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
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

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
    AnnotationSession,
    WebAnnotator,
    default_round,
    resolve_model,
)
from maskmill.flows.cli import build_parser, main
from maskmill.model import build_model, has_default, save_checkpoint
from maskmill.storage import Catalog, Store, WriterConflictError, import_coco, rle
from maskmill.storage.queries import ground_truth

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
            "segmentation, height, width FROM masks WHERE round = ? AND stage = ? "
            "ORDER BY image_id, mask_id",
            [round_, stage],
        )
    return [dict(zip(columns, row, strict=True)) for row in rows]


def post(client: TestClient, path: str, body: object = None):
    return client.post(path, content=json.dumps(body if body is not None else {}), headers=JSON)


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
    (row,) = stored_masks(store)
    assert row["clicks"] == [{"x": 10, "y": 12, "label": 2}, {"x": 90, "y": 80, "label": 3}]


def test_undo_delete_next_and_round_row(client, session, store):
    ids = sorted(session.images)
    image_id = client.get("/api/next").json()["image"]["image_id"]
    x, y = object_point(store, image_id)
    for _ in range(2):
        post(client, f"/api/images/{image_id}/predict", {"points": [[x, y, 1]]})
        post(client, f"/api/images/{image_id}/accept", {})
    assert len(stored_masks(store)) == 2
    state = post(client, f"/api/images/{image_id}/delete", {"index": 0}).json()
    assert len(state["masks"]) == 1 and len(stored_masks(store)) == 1
    state = post(client, f"/api/images/{image_id}/undo").json()  # the delete comes back
    assert len(state["masks"]) == 2 and len(stored_masks(store)) == 2
    post(client, f"/api/images/{image_id}/undo")  # the second accept goes
    assert len(stored_masks(store)) == 1
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


def test_second_writer_is_refused_until_the_first_closes(store, model, session):
    with pytest.raises(WriterConflictError), AnnotationSession(store, 1, "manual", model):
        pass
    session.close()
    with AnnotationSession(store, 1, "manual", model) as again:
        assert again.writer.lease.held


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
    assert "no images" in capsys.readouterr().err
    assert main(["serve", "--store", str(empty), "--checkpoint", str(tmp_path / "no.pt")]) == 2
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


def _install_chromium() -> None:
    """``apt-get install chromium`` (after ``apt-get update`` if the first try fails), as root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "chromium"]
    if subprocess.run(install, env=env, capture_output=True, timeout=1200).returncode == 0:
        return
    subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
    subprocess.run(install, env=env, capture_output=True, timeout=1200)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium for Playwright (installed here if missing). Missing it fails the test
    under CI and skips it elsewhere."""
    if not os.path.exists(CHROMIUM):
        _install_chromium()
    problem = None
    if not os.path.exists(CHROMIUM):
        problem = f"{CHROMIUM} is missing and `apt-get install -y chromium` could not add it"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is not installed (pip install -e '.[test]')"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return CHROMIUM


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
            page.goto(f"{base}/")
            page.wait_for_selector('body[data-state="ready"]', timeout=60_000)
            box = page.locator("#canvas").bounding_box()
            assert box is not None and (box["width"], box["height"]) == (480, 360)

            def click(x: int, y: int, button: str = "left") -> None:
                # The canvas shows the image at 1:1: CSS pixel (x, y) is image pixel (x, y).
                page.mouse.click(box["x"] + x + 0.5, box["y"] + y + 0.5, button=button)

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

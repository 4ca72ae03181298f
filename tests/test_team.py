"""Annotation teams (issue 13): accounts and their login tokens, the server's refusals (401, CSRF,
a network bind without accounts), many people on one server and several servers on one store.

Stores are made here from generated scenes (as in tests/test_serve.py); the model is a ``tiny``
one with fixed random weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():  # starlette >= 1.0 prefers httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from maskmill.engine.training.synthetic import write_coco
from maskmill.engine.web.app import SESSION_COOKIE, create_app, is_loopback
from maskmill.engine.web.session import AnnotationSession, WebAnnotator
from maskmill.model import build_model, save_checkpoint
from maskmill.storage import Catalog, Store, import_coco
from maskmill.storage.accounts import Accounts, hash_token
from maskmill.storage.claims import ImageClaims
from maskmill.storage.queries import image_infos

# Chromium and the live server as tests/test_serve.py has them (``chromium``: a fixture).
from tests.test_serve import (  # noqa: F401
    CHROMIUM_ARGS,
    chromium,
    client_point,
    live_server,
    object_point,
)

JSON = {"Content-Type": "application/json"}
MASKMILL = [sys.executable, "-m", "maskmill.flows.cli"]


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("team-scenes")
    annotations = write_coco(folder, 4, seed=13, height=96, width=128, parts=False)
    return str(folder / "images"), str(annotations)


@pytest.fixture()
def store(tmp_path, scenes) -> Store:
    images, annotations = scenes
    import_coco(annotations, images, str(tmp_path / "store"))
    return Store(str(tmp_path / "store"))


def maskmill(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real ``maskmill`` entry point, in a subprocess."""
    result = subprocess.run(
        [*MASKMILL, *args], capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def add_user(store: Store, name: str, role: str = "annotator") -> str:
    """``maskmill users add``; returns the token it printed."""
    out = maskmill("users", "add", name, "--store", store.url, "--role", role).stdout
    lines = out.splitlines()
    assert lines[0] == f"added {name} ({role}) to {store.url}; shown once, keep it secret:"
    token = lines[2].removeprefix("token (Authorization: Bearer): ")
    assert lines[1] == f"login link: http://127.0.0.1:8765/login?token={token}"
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def team(store, model):
    """A store with accounts ana and bob, a session on round 1 (manual) and its app's client
    (no cookies yet); yields (session, client, {name: token})."""
    tokens = {"ana": add_user(store, "ana"), "bob": add_user(store, "bob", "reviewer")}
    with (
        AnnotationSession(store, 1, "manual", model, None, WebAnnotator("host")) as session,
        TestClient(create_app(session)) as client,
    ):
        yield session, client, tokens


# ------------------------------------------------------------------------------- accounts


def test_tokens_are_stored_hashed_and_shown_once(store):
    token = add_user(store, "ana")
    assert len(token) >= 43  # 32 random bytes, URL-safe base64
    stored = b"".join(p.read_bytes() for p in Path(store.root).rglob("*") if p.is_file())
    assert token.encode() not in stored  # in no stored byte, in no file
    assert hash_token(token).encode() in stored
    listing = maskmill("users", "list", "--store", store.url).stdout
    assert token not in listing
    assert listing.splitlines()[0] == "name\trole\tstatus\tcreated_at\trevoked_at"
    assert listing.splitlines()[1].startswith("ana\tannotator\tactive\t")
    # A second account of an active name is refused; a revoked one gets a new token.
    again = maskmill("users", "add", "ana", "--store", store.url, check=False)
    assert again.returncode == 2
    assert again.stderr == (
        f"maskmill users: ana already has an account in {store.url}; revoke it first "
        "(maskmill users revoke) to give them a new token\n"
    )
    maskmill("users", "revoke", "ana", "--store", store.url)
    assert Accounts(store).authenticate(token) is None
    renewed = add_user(store, "ana")
    assert renewed != token and Accounts(store).authenticate(renewed).name == "ana"
    assert Accounts(store).authenticate(token) is None
    bad = maskmill("users", "add", "a b", "--store", store.url, check=False)
    assert (bad.returncode, bad.stderr.count("\n")) == (2, 1)
    assert "user name 'a b' is not allowed" in bad.stderr


def test_login_link_uses_the_given_host_and_port(store):
    out = maskmill(
        "users", "add", "ana", "--store", store.url, "--host", "annotate.lab", "--port", "9000"
    ).stdout
    assert out.splitlines()[1].startswith("login link: http://annotate.lab:9000/login?token=")


# --------------------------------------------------------------------------------- the server


def test_requests_without_a_valid_token_are_401(team):
    session, client, tokens = team
    image_id = sorted(session.images)[0]
    predict = f"/api/images/{image_id}/predict"
    body = json.dumps({"points": [[5, 5, 1]]})
    for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic YW5hOmFuYQ=="}):
        for path in ("/", "/api/next", f"/api/images/{image_id}"):
            response = client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert "error" in response.json()
        response = client.post(predict, content=body, headers={**JSON, **headers})
        assert response.status_code == 401
    assert client.get("/api/next").json() == {
        "error": "log in first: open your login link (maskmill users add prints it), or send "
        "Authorization: Bearer <token>"
    }
    assert client.get("/api/next", headers=bearer("nope")).json() == {
        "error": "invalid or revoked token: ask for a new login link"
    }
    assert client.get("/login?token=nope").status_code == 401
    # The refusals of a server without accounts stay: unknown ids and traversal are 404.
    ok = bearer(tokens["ana"])
    assert client.get("/api/images/..%2F..%2Fpyproject.toml", headers=ok).status_code == 404
    assert client.post(predict, content=body, headers=ok).status_code == 415  # JSON only
    state = client.get("/api/next", headers=ok).json()
    assert state["user"] == "ana" and state["annotator"] == "web:ana"


def test_login_sets_an_httponly_strict_cookie_and_csrf_guards_its_posts(team):
    session, client, tokens = team
    response = client.get(f"/login?token={tokens['ana']}")
    assert response.status_code == 200 and 'url=/"' in response.text
    assert response.headers["referrer-policy"] == "no-referrer"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert client.get("/").status_code == 200  # the cookie is the session
    state = client.get("/api/next").json()
    assert state["user"] == "ana"
    image_id = state["image"]["image_id"]
    predict = f"/api/images/{image_id}/predict"
    body = json.dumps({"points": [[5, 5, 1]]})
    refused = {
        "error": "missing or wrong X-CSRF-Token header (the page sends the csrf value "
        "GET /api/next gives it)"
    }
    response = client.post(predict, content=body, headers=JSON)
    assert (response.status_code, response.json()) == (403, refused)
    response = client.post(predict, content=body, headers={**JSON, "X-CSRF-Token": "0" * 64})
    assert (response.status_code, response.json()) == (403, refused)
    # Another person's CSRF value does not fit this cookie.
    bob = TestClient(client.app).get("/api/next", headers=bearer(tokens["bob"])).json()
    response = client.post(predict, content=body, headers={**JSON, "X-CSRF-Token": bob["csrf"]})
    assert response.status_code == 403
    response = client.post(predict, content=body, headers={**JSON, "X-CSRF-Token": state["csrf"]})
    assert response.status_code == 200, response.text
    # A Bearer request needs no CSRF value: a cross-site page cannot set that header.
    with TestClient(client.app) as api:
        assert api.post(predict, content=body, headers={**JSON, **bearer(tokens["ana"])}).is_success


def test_a_revoked_token_stops_working_at_once(team):
    session, client, tokens = team
    client.get(f"/login?token={tokens['ana']}")
    assert client.get("/api/next").status_code == 200  # cookie
    assert client.get("/api/next", headers=bearer(tokens["ana"])).status_code == 200
    maskmill("users", "revoke", "ana", "--store", session.store.url)
    # The very next requests, well within the accounts cache's one second: refused.
    assert client.get("/api/next").status_code == 401
    assert client.get("/api/next", headers=bearer(tokens["ana"])).status_code == 401
    assert client.get(f"/login?token={tokens['ana']}").status_code == 401
    assert client.get("/api/next", headers=bearer(tokens["bob"])).status_code == 200


def test_no_accounts_no_login(store, model):
    """Without accounts the page works as before: no token, and the person is the session's."""
    with (
        AnnotationSession(store, 1, "manual", model, None, WebAnnotator("solo")) as session,
        TestClient(create_app(session)) as client,
    ):
        state = client.get("/api/next").json()
        assert (state["user"], state["csrf"], state["annotator"]) == (None, None, "web:solo")
        assert client.get("/login?token=x").status_code == 404


def test_network_bind_needs_accounts(store, tmp_path):
    assert [is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost")] == [
        True
    ] * 5
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "annotate.lab"))
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(build_model("tiny", seed=0), str(checkpoint))
    for host in ("0.0.0.0", "10.0.0.5"):
        serve = ["serve", "--store", store.url, "--checkpoint", str(checkpoint)]
        result = maskmill(*serve, "--host", host, check=False)
        assert result.returncode == 2
        assert result.stderr == (
            f"maskmill serve: refusing to serve {store.url} on {host} without accounts: add one "
            f"per person first (maskmill users add NAME --store {store.url}), or bind 127.0.0.1\n"
        )


# ------------------------------------------------------------------- many people, many servers


def annotate_one(client: TestClient, headers: dict[str, str]) -> str | None:
    """One person's turn through the HTTP API: their image, a click, accept, next image.
    Returns the image done, None when the person has no image (others hold the rest)."""
    state = client.get("/api/next", headers=headers).json()
    if state["done"]:
        return None
    image_id = state["image"]["image_id"]
    url = f"/api/images/{image_id}"
    predicted = client.post(
        f"{url}/predict", content=json.dumps({"points": [[40, 40, 1]]}), headers={**JSON, **headers}
    )
    assert predicted.status_code == 200, predicted.text
    accepted = client.post(f"{url}/accept", content="{}", headers={**JSON, **headers})
    assert accepted.status_code == 200, accepted.text
    finished = client.post(f"{url}/next", content="{}", headers={**JSON, **headers})
    assert finished.status_code == 200, finished.text
    return image_id


def stored(store: Store) -> list[tuple[str, str]]:
    """(image_id, source) of every stored mask of round 1 (manual), by image."""
    with Catalog(store) as catalog:
        _, rows = catalog.query(
            "SELECT image_id, source FROM masks WHERE round = 1 AND stage = 'manual' "
            "ORDER BY image_id, mask_id"
        )
    return [tuple(row) for row in rows]


def test_two_people_on_one_server_get_their_own_images_and_masks(team):
    session, client, tokens = team
    ana, bob = bearer(tokens["ana"]), bearer(tokens["bob"])
    ids = sorted(session.images)
    mine = client.get("/api/next", headers=ana).json()
    theirs = client.get("/api/next", headers=bob).json()
    assert (mine["image"]["image_id"], theirs["image"]["image_id"]) == (ids[0], ids[1])
    assert (mine["annotator"], theirs["annotator"]) == ("web:ana", "web:bob")
    # Ana cannot act on Bob's image: it is not hers.
    response = client.post(
        f"/api/images/{ids[1]}/predict",
        content=json.dumps({"points": [[40, 40, 1]]}),
        headers={**JSON, **ana},
    )
    assert response.status_code == 409
    assert response.json()["error"] == (
        f"image {ids[1]} is not the one being annotated (that is {ids[0]})"
    )
    # Each works on their own image, with their own predictor and undo history.
    assert annotate_one(client, bob) == ids[1]
    assert annotate_one(client, ana) == ids[0]
    assert stored(session.store) == [(ids[0], "web:ana"), (ids[1], "web:bob")]
    assert session.workspace("ana").annotator.work(ids[1]).masks == []


def test_an_expired_claim_sends_the_image_back_and_its_holder_is_told(store, model):
    tokens = {"ana": add_user(store, "ana"), "bob": add_user(store, "bob")}
    ana, bob = bearer(tokens["ana"]), bearer(tokens["bob"])
    with (
        AnnotationSession(store, 1, "manual", model, claim_ttl_s=1.0) as session,
        TestClient(create_app(session)) as client,
    ):
        ids = sorted(session.images)
        assert client.get("/api/next", headers=ana).json()["image"]["image_id"] == ids[0]
        url = f"/api/images/{ids[0]}"
        body = json.dumps({"points": [[40, 40, 1]]})
        assert client.post(f"{url}/predict", content=body, headers={**JSON, **ana}).is_success
        # While her page is open its heartbeat keeps the claim past its 1 s.
        for _ in range(4):
            time.sleep(0.4)
            beat = client.post("/api/heartbeat", content="{}", headers={**JSON, **ana})
            assert beat.json() == {"image_id": ids[0], "claim_ttl_s": 1.0}
        assert client.get("/api/next", headers=bob).json()["image"]["image_id"] == ids[1]
        state = client.post(f"/api/images/{ids[1]}/next", content="{}", headers={**JSON, **bob})
        assert state.json()["image"]["image_id"] == ids[2]
        # Her browser dies: the claim expires and the image goes to the next person asking.
        time.sleep(1.3)
        state = client.post(f"/api/images/{ids[2]}/next", content="{}", headers={**JSON, **bob})
        assert state.json()["image"]["image_id"] == ids[0]
        response = client.post(f"{url}/accept", content="{}", headers={**JSON, **ana})
        assert response.status_code == 409
        error = response.json()
        assert error["reload"] is True
        assert error["error"].startswith(
            f"image {ids[0]} is no longer yours: your claim on it expired and it went back to "
            "the queue ("
        )
        assert "What you did on it was not saved" in error["error"]
        # Told once; her next request opens another image, and Bob's work on hers stands.
        assert client.get("/api/next", headers=ana).json()["image"]["image_id"] == ids[3]
        assert annotate_one(client, bob) == ids[0]
    assert stored(store) == [(ids[0], "web:bob")]


def test_two_servers_on_one_store_do_every_image_exactly_once(store, tmp_path):
    """A ``maskmill serve`` process and an in-process app share one store and round: three
    people annotate it concurrently over HTTP until nothing is left."""
    names = ["ana", "bob", "cid"]
    tokens = {name: add_user(store, name) for name in names}
    checkpoint = tmp_path / "tiny.pt"
    model = build_model("tiny", seed=0)
    save_checkpoint(model, str(checkpoint))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = ["serve", "--store", store.url, "--round", "1", "--checkpoint", str(checkpoint)]
    server = subprocess.Popen(
        [*MASKMILL, *serve, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        remote = RemoteClient(f"http://127.0.0.1:{port}", server)
        assert remote.get(f"/login?token={tokens['ana']}", headers={}).status_code == 200
        with (
            AnnotationSession(store, 1, "manual", model) as session,
            TestClient(create_app(session)) as local,
        ):
            done: dict[str, list[str]] = {}

            def person(name: str, client: Any) -> None:
                headers = bearer(tokens[name])
                mine = done.setdefault(name, [])
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline:
                    image_id = annotate_one(client, headers)
                    if image_id is not None:
                        mine.append(image_id)
                        continue
                    if client.get("/api/next", headers=headers).json()["waiting"] == 0:
                        return
                    time.sleep(0.2)

            threads = [
                threading.Thread(target=person, args=("ana", remote)),
                threading.Thread(target=person, args=("bob", remote)),
                threading.Thread(target=person, args=("cid", local)),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
            assert not any(thread.is_alive() for thread in threads)
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=60)
    ids = sorted(Store(store.url).shard_keys("masks", 1, "manual"))
    everyone = sorted(i for images in done.values() for i in images)
    assert everyone == ids == sorted(image_infos(store))  # every image, each once
    rows = stored(store)
    assert len(rows) == len(ids)  # one mask per image: none lost, none twice
    authors = {image_id: source for image_id, source in rows}
    for name, images in done.items():
        assert {authors[i] for i in images} <= {f"web:{name}"}
    assert len(done["cid"]) >= 1 and len(done["ana"]) + len(done["bob"]) >= 1, (done, out)
    with Catalog(store) as catalog:
        _, rounds = catalog.query("SELECT round, stage, images, masks FROM rounds WHERE round = 1")
    assert rounds == [(1, "manual", len(ids), len(ids))]
    assert not list(Path(store.root, "locks", "claims").rglob("*.json"))  # no claim left
    # The server's access log shows the login, not its token.
    assert "GET /login?token=<hidden> HTTP/1.1" in out
    assert not any(token in out for token in tokens.values())


class RemoteClient:
    """The few ``TestClient`` calls :func:`annotate_one` makes, over real HTTP to a server
    process (waits for it to answer first)."""

    def __init__(self, base: str, process: subprocess.Popen) -> None:
        self.base = base
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/", timeout=5)
            except urllib.error.HTTPError:  # 401: up, and asking for a login
                return
            except OSError as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = process.stdout.read() if process.poll() is not None else ""
                    raise RuntimeError(f"maskmill serve did not start: {output}") from error
                time.sleep(0.2)

    def get(self, path: str, headers: dict[str, str]) -> Answer:
        return self._send("GET", path, None, headers)

    def post(self, path: str, content: str, headers: dict[str, str]) -> Answer:
        return self._send("POST", path, content.encode(), headers)

    def _send(self, method: str, path: str, data: bytes | None, headers: dict) -> Answer:
        request = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return Answer(response.status, response.read().decode())
        except urllib.error.HTTPError as error:
            return Answer(error.code, error.read().decode())


class Answer:
    """An HTTP answer, as much of httpx's Response as the tests use."""

    def __init__(self, status_code: int, text: str) -> None:
        self.status_code = status_code
        self.text = text

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        return json.loads(self.text)


# ---------------------------------------------------------------------------- in Chromium


def test_the_page_logs_in_and_sends_its_csrf_value(chromium, store, model):  # noqa: F811
    """The login link in a browser: the cookie is set (HttpOnly: the page's script cannot read
    it), the page says who is logged in, its POSTs carry the CSRF value (a POST without it is
    refused), and the mask it stores carries the person's name."""
    from playwright.sync_api import sync_playwright

    token = add_user(store, "ana")
    with (
        AnnotationSession(store, 1, "manual", model) as session,
        live_server(session) as base,
        sync_playwright() as playwright,
    ):
        ids = sorted(session.images)
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 860, "height": 420})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{base}/login?token={token}")
            page.wait_for_selector('body[data-state="ready"]', timeout=60_000)
            assert page.url == f"{base}/"
            assert page.locator("#user").inner_text() == "logged in as ana"
            assert page.evaluate("document.cookie") == ""
            forged = "fetch('/api/heartbeat', {method: 'POST', headers: {'Content-Type': " + (
                "'application/json'}, body: '{}'}).then((r) => r.status)"
            )
            assert page.evaluate(forged) == 403  # the cookie alone is not enough
            page.mouse.click(*client_point(page, 40, 40))
            page.wait_for_selector('body[data-predictions="1"]', timeout=30_000)
            page.keyboard.press("Enter")
            page.wait_for_selector('body[data-masks="1"]', timeout=30_000)
            page.keyboard.press("n")
            page.wait_for_function(
                f"document.getElementById('image-id').textContent.startsWith('{ids[1]}')",
                timeout=30_000,
            )
            assert not errors, errors
        finally:
            browser.close()
    assert stored(store) == [(ids[0], "web:ana")]


def test_three_people_in_chromium_annotate_one_round_at_once(chromium, store, model):  # noqa: F811
    """Three browser contexts (three accounts) on one live server: each clicks an object of
    their image, accepts it and moves on, the three at once, until the round is done. Every
    image is done exactly once, its one mask stored (none lost, none twice) under its author."""
    from playwright.sync_api import sync_playwright

    names = ["ana", "bob", "cid"]
    accounts = Accounts(store)
    tokens = {name: accounts.add(name) for name in names}
    points = {image_id: object_point(store, image_id) for image_id in image_infos(store)}
    done: dict[str, list[str]] = {name: [] for name in names}
    with (
        AnnotationSession(store, 1, "manual", model) as session,
        live_server(session) as base,
        sync_playwright() as playwright,
    ):
        ids = sorted(session.images)
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            pages, errors = {}, []
            for name in names:  # one context each: its own cookie, so its own person
                context = browser.new_context(viewport={"width": 860, "height": 420})
                page = pages[name] = context.new_page()
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(f"{base}/login?token={tokens[name]}")
            for page in pages.values():
                page.wait_for_selector('body[data-state="ready"]', timeout=60_000)

            def image_of(page) -> str:
                return page.locator("#image-id").inner_text().split(" ")[0]

            deadline = time.monotonic() + 180
            while working := {n: image_of(p) for n, p in pages.items() if image_of(p)}:
                assert time.monotonic() < deadline, done
                # Each step is taken on every page before any page waits for its answer, so
                # the three people's requests overlap on the server.
                before = {
                    n: int(pages[n].get_attribute("body", "data-predictions")) for n in working
                }
                for name, image_id in working.items():
                    pages[name].mouse.click(*client_point(pages[name], *points[image_id]))
                for name in working:
                    selector = f'body[data-predictions="{before[name] + 1}"]'
                    pages[name].wait_for_selector(selector, timeout=30_000)
                for name in working:
                    pages[name].keyboard.press("Enter")
                for name in working:
                    pages[name].wait_for_selector('body[data-masks="1"]', timeout=30_000)
                for name in working:
                    pages[name].keyboard.press("n")
                for name, image_id in working.items():
                    pages[name].wait_for_function(
                        "!document.getElementById('image-id').textContent"
                        f".startsWith('{image_id}')",
                        timeout=60_000,
                    )
                    pages[name].wait_for_selector('body[data-busy="0"]', timeout=60_000)
                    done[name].append(image_id)
            # A page left waiting on others asks again every 10 s; a reload asks now.
            for page in pages.values():
                page.reload()
                page.wait_for_selector('body[data-state="done"]', timeout=60_000)
                assert "every image is done" in page.locator("#where").inner_text()
            assert not errors, errors
        finally:
            browser.close()
    everyone = sorted(i for images in done.values() for i in images)
    assert everyone == ids  # every image, each by one person
    assert all(done.values()), done  # the three worked at once: each had an image
    authors = {image_id: f"web:{name}" for name, images in done.items() for image_id in images}
    assert stored(store) == sorted(authors.items())  # one mask per image, by its author
    with Catalog(store) as catalog:
        _, rows = catalog.query(
            "SELECT count(*), count(DISTINCT mask_id) FROM masks WHERE round = 1 AND "
            "stage = 'manual'"
        )
        _, rounds = catalog.query("SELECT images, masks FROM rounds WHERE round = 1")
    assert rows == [(len(ids), len(ids))] and rounds == [(len(ids), len(ids))]
    assert not list(Path(store.root, "locks", "claims").rglob("*.json"))


# ------------------------------------------------------------------------------- faults


def start_serve(store: Store, checkpoint: Path) -> tuple[subprocess.Popen, RemoteClient]:
    """A ``maskmill serve`` process on round 1 (manual) of ``store``, answering."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = ["serve", "--store", store.url, "--round", "1", "--checkpoint", str(checkpoint)]
    server = subprocess.Popen(
        [*MASKMILL, *serve, "--port", str(port)],
        stdout=subprocess.PIPE,  # a few requests' access log: it never fills the pipe
        stderr=subprocess.STDOUT,
        text=True,
    )
    return server, RemoteClient(f"http://127.0.0.1:{port}", server)


def click_and_accept(client: Any, headers: dict[str, str], image_id: str) -> None:
    url = f"/api/images/{image_id}"
    body = json.dumps({"points": [[40, 40, 1]]})
    assert client.post(f"{url}/predict", content=body, headers={**JSON, **headers}).is_success
    assert client.post(f"{url}/accept", content="{}", headers={**JSON, **headers}).is_success


def test_a_server_killed_mid_accept_leaves_nothing_half_written(store, model, tmp_path):
    """SIGKILL of a ``maskmill serve`` process (1) between a person's accept and "next image",
    (2) the moment an accept's shard starts being written: nothing half-written is visible; an
    accepted mask is kept whole (an accept is stored at once, so a dead browser or server loses
    nothing accepted), and an image whose write was cut is redone, at once, by a person on
    another server (a dead process's claims on this host are free at once, without waiting out
    their ttl)."""
    accounts = Accounts(store)
    ana, bob = bearer(accounts.add("ana")), bearer(accounts.add("bob"))
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(model, str(checkpoint))
    ids = sorted(image_infos(store))
    folder = Path(store.table_dir("masks", 1, "manual"))
    claims = ImageClaims(store, 1, "manual", owner="test")

    def visible() -> list[tuple[str, str]]:
        """What DuckDB reads of round 1: every committed shard, whole."""
        return stored(Store(store.url))

    with (
        AnnotationSession(store, 1, "manual", model) as session,
        TestClient(create_app(session)) as local,
    ):
        # (1) Killed between accept and next: the accepted mask is stored, the image kept.
        server, remote = start_serve(store, checkpoint)
        try:
            assert remote.get("/api/next", headers=ana).json()["image"]["image_id"] == ids[0]
            click_and_accept(remote, ana, ids[0])
        finally:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        assert visible() == [(ids[0], "web:ana")]
        assert claims.holder(ids[0]) is None  # its holder is dead: nobody holds it
        assert annotate_one(local, bob) == ids[1]  # ids[0] is done: not handed out again

        # (2) Killed as an accept's shard is written: ana's next image is ids[3] (bob's
        # "next image" opened ids[3] for him).
        server, remote = start_serve(store, checkpoint)
        answers: list[Any] = []
        try:
            assert remote.get("/api/next", headers=ana).json()["image"]["image_id"] == ids[3]
            url = f"/api/images/{ids[3]}"
            body = json.dumps({"points": [[40, 40, 1]]})
            assert remote.post(f"{url}/predict", content=body, headers={**JSON, **ana}).is_success

            def accept() -> None:
                try:
                    answers.append(
                        remote.post(f"{url}/accept", content="{}", headers={**JSON, **ana})
                    )
                except OSError as error:  # the connection dies with the server
                    answers.append(error)

            thread = threading.Thread(target=accept)
            thread.start()
            # SIGKILL at the first sign of the write (its temp file, or the shard itself).
            deadline = time.monotonic() + 120
            while not any(
                f".part-{ids[3]}." in n or n == f"part-{ids[3]}.parquet"
                for n in (os.listdir(folder))
            ):
                assert time.monotonic() < deadline and thread.is_alive(), answers
        finally:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        thread.join(timeout=60)
        kept = store.has_shard("masks", ids[3], 1, "manual")
        assert claims.holder(ids[3]) is None
        # Whole or absent: DuckDB reads every committed shard, no temp file is ever read.
        expected = [(ids[0], "web:ana"), (ids[1], "web:bob")]
        assert visible() == expected + ([(ids[3], "web:ana")] if kept else [])
        # Bob finishes the round; ids[3] is redone by him unless it was kept whole.
        by_bob = [ids[1]]
        for _ in range(len(ids)):
            image_id = annotate_one(local, bob)
            if image_id is None:
                break
            by_bob.append(image_id)
        assert sorted(by_bob + [ids[0]] + ([ids[3]] if kept else [])) == ids
    assert sorted(store.shard_keys("masks", 1, "manual")) == ids  # each image once
    authors = dict.fromkeys(ids, "web:bob") | {ids[0]: "web:ana"}
    authors |= {ids[3]: "web:ana"} if kept else {}
    assert visible() == sorted(authors.items())
    if not kept:  # the killed writer's temp file went when bob claimed the image
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    with Catalog(store) as catalog:
        _, rounds = catalog.query("SELECT images, masks FROM rounds WHERE round = 1")
    assert rounds == [(len(ids), len(ids))]
    assert all(claims.holder(i) is None for i in ids)  # no live claim left

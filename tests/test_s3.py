"""A real S3 endpoint (issue 15): moto's standalone server on 127.0.0.1, started and stopped by
these tests, reached through s3fs as any S3 service is (``AWS_ENDPOINT_URL`` and the usual
credential variables, which the ``maskmill`` subprocesses, their local Ray workers and the web
server inherit). Everything lives in the bucket: images, ground truth, the starting model and
the stores.

What is tested: exclusive creates are conditional PUTs (one of two creates of a key wins, and
so does one of two claimants of an image); a store whose server ignores ``If-None-Match`` is
refused with a clear error; ``import-coco``, ``run`` (an assisted-manual round and the automatic
pass on Ray), ``stats``, ``export`` and ``serve`` on an ``s3://`` store, checked against DuckDB
over the same store; and a ``run`` killed with SIGKILL mid-stage, then resumed, ends with the
masks of the run that was not killed: none lost, none twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.moto_server.threaded_moto_server")

from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server  # noqa: E402

from maskmill.engine.evaluate import interior_point  # noqa: E402
from maskmill.engine.training.synthetic import write_coco  # noqa: E402
from maskmill.flows.cli import main  # noqa: E402
from maskmill.model import build_model, save_checkpoint  # noqa: E402
from maskmill.storage import (  # noqa: E402
    Catalog,
    ImageClaims,
    NoExclusiveCreateError,
    Store,
    rle,
)
from maskmill.storage.queries import ground_truth  # noqa: E402
from tests.conftest import run_arguments  # noqa: E402
from tests.test_engine_flow import FAST  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MASKMILL = [sys.executable, "-m", "maskmill.flows.cli"]
BUCKET = "maskmill-test"
# A small, fast run (tests/test_engine_flow.py's FAST settings): 3 scenes of 96 px, none held
# out (no held-out evaluation: it would double the run's time), all in one assisted-manual
# round, any overlap accepted, every generated mask kept, no retraining; given as `maskmill run`
# options by tests.conftest.run_arguments.
RUN = {
    **FAST,
    "holdout": 0.0,
    "manual_rounds": 1,
    "semi_rounds": 0,
    "seed": 0,
    "workers": 1,
    "retrain_steps": 0,
    "max_clicks": 20,  # the default: `maskmill run` has no option for it
}
SCENES = 3  # the kill test's run dies with one image committed, one claimed, one to go


# ----------------------------------------------------------------------------- the S3 server


class AtomicMotoServer(moto_server.ThreadedMotoServer):
    """moto's threaded server, answering one request at a time: moto checks a PUT's
    ``If-None-Match`` and stores the object in two steps, which S3 does as one; serialised, the
    server is as atomic as S3, so racing creates test maskmill, not moto."""

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        lock = threading.Lock()

        def one_at_a_time(environ, start_response):
            with lock:
                return list(app(environ, start_response))

        self._server = make_server(
            self._ip_address, self._port, one_at_a_time, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 and a free port, for the session; its URL."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = AtomicMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3_env(s3_endpoint) -> Iterator[dict[str, str]]:
    """The environment a user sets for an S3 endpoint (README, "Object stores"), set for this
    module's tests and the processes they start (restored afterwards), and the bucket."""
    import fsspec

    variables = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            patch.delenv(name, raising=False)
        for name, value in variables.items():
            patch.setenv(name, value)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        yield variables


def s3_url(name: str) -> str:
    """A fresh prefix in the test bucket."""
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def maskmill(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """The real ``maskmill`` entry point in a subprocess (this process's environment: the S3
    variables)."""
    return subprocess.run(
        [*MASKMILL, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ----------------------------------------------------------------------- exclusive creates


@pytest.mark.timeout(60)
def test_two_creates_of_one_key_one_wins(s3_env):
    store = Store(s3_url("exclusive")).require(create=True)
    path = store.path("locks", "one.lock")
    store.create_exclusive(path, b"first")
    with pytest.raises(FileExistsError, match="one.lock"):
        store.create_exclusive(path, b"second")
    assert store.fs.cat_file(path) == b"first"

    # racing: 8 threads, 10 keys; every key created by exactly one thread, never overwritten
    outcomes: dict[str, list[int]] = {f"k{i}": [] for i in range(10)}
    barrier = threading.Barrier(8)

    def create_all(thread: int) -> None:
        barrier.wait()
        for key in outcomes:
            try:
                store.create_exclusive(store.path("race", key), str(thread).encode())
            except FileExistsError:
                continue
            outcomes[key].append(thread)

    threads = [threading.Thread(target=create_all, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(winners) == 1 for winners in outcomes.values()), outcomes
    for key, (winner,) in outcomes.items():
        assert store.fs.cat_file(store.path("race", key)) == str(winner).encode()
    # the capability probe left nothing behind
    assert store.fs.glob(store.path("locks", ".exclusive-create-probe-*")) == []


@pytest.mark.timeout(60)
def test_two_claimants_of_one_image_one_wins(s3_env):
    url = s3_url("claims")
    ana = ImageClaims(url, 1, "manual", owner="ana")
    bo = ImageClaims(Store(url), 1, "manual", owner="bo")  # another process's view
    assert ana.claim("img0") is True
    assert bo.claim("img0") is False
    assert bo.holder("img0")["owner"] == "ana"
    assert bo.claim_next(["img0", "img1"]) == "img1"
    assert (ana.held(), bo.held()) == (["img0"], ["img1"])

    # racing for 6 images with 4 claimants each: one holder per image
    images = [f"race{i}" for i in range(6)]
    won: dict[str, list[str]] = {image: [] for image in images}
    barrier = threading.Barrier(4)

    def claim_all(owner: str) -> None:
        claims = ImageClaims(url, 1, "manual", owner=owner)
        barrier.wait()
        for image in images:
            if claims.claim(image):
                won[image].append(owner)

    threads = [threading.Thread(target=claim_all, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(owners) == 1 for owners in won.values()), won
    for image, (owner,) in won.items():
        assert ana.holder(image)["owner"] == owner
    ana.release("img0")
    assert bo.claim("img0") is True


@pytest.mark.timeout(60)
def test_a_server_that_ignores_if_none_match_is_refused(s3_env, monkeypatch):
    """An S3-compatible server that overwrites on a conditional PUT is found by the probe at
    first use: a clear error naming the store, and nothing written."""
    url = s3_url("no-conditional-puts")
    store = Store(url)
    send = store.fs._call_s3

    async def without_the_condition(method, *args, **kwargs):
        kwargs.pop("IfNoneMatch", None)  # what such a server does with the header
        return await send(method, *args, **kwargs)

    monkeypatch.setattr(store.fs, "_call_s3", without_the_condition)
    with pytest.raises(NoExclusiveCreateError) as refused:
        store.require(create=True)
    assert str(refused.value).startswith(
        f"{url}: this store cannot create an object only when none is there: the server "
        "accepted a second create of one key (it ignores If-None-Match: *). Writer leases and "
        "image claims cannot be safe on it"
    )
    with pytest.raises(NoExclusiveCreateError):
        ImageClaims(store, 1, "manual", owner="ana").claim("img0")
    monkeypatch.undo()
    assert store.fs.find(store.root) == []  # no lock, no claim, no probe left


# ------------------------------------------------------------------- the engine on S3, by CLI


@pytest.fixture(scope="module")
def inputs(s3_env, tmp_path_factory) -> dict[str, str]:
    """Generated scenes (images and COCO file) and a tiny random-weight model, in the bucket."""
    import fsspec

    folder = tmp_path_factory.mktemp("s3-scenes")
    annotations = write_coco(folder, SCENES, seed=3, height=96, width=96, parts=False)
    checkpoint = folder / "tiny.pt"
    save_checkpoint(build_model("tiny", seed=0), str(checkpoint))
    prefix = s3_url("inputs")
    fs = fsspec.filesystem("s3")
    fs.put(str(folder / "images") + "/", f"{prefix}/images/", recursive=True)
    fs.put(str(annotations), f"{prefix}/instances.json")
    fs.put(str(checkpoint), f"{prefix}/tiny.pt")
    return {
        "images": f"{prefix}/images",
        "annotations": f"{prefix}/instances.json",
        "checkpoint": f"{prefix}/tiny.pt",
    }


def _run_command(store: str, inputs: dict[str, str], auto: bool) -> list[str]:
    return run_arguments({"store": store, **inputs, **RUN, "auto": auto})


def _masks(store: str, where: str = "stage <> 'gt'") -> list[tuple]:
    """Every mask of ``store`` matching ``where`` (id, image, round, stage, pixels), by id."""
    with Catalog(store) as catalog:
        return catalog.con.execute(
            "SELECT mask_id, image_id, round, stage, segmentation FROM masks "
            f"WHERE {where} ORDER BY mask_id"
        ).fetchall()


@pytest.fixture(scope="module")
def engine_store(inputs, prefect_server) -> str:
    """An ``s3://`` store made by the CLI: ``import-coco`` (its entry point, in this process),
    then ``run`` in a process of its own (one assisted-manual round, then the automatic pass on
    a local Ray cluster the run starts)."""
    store = s3_url("engine")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["import-coco", "--annotations", inputs["annotations"], "--images", inputs["images"]]
            + ["--store", store]
        )
    assert code == 0
    objects = len(json.loads(_cat(inputs["annotations"]))["annotations"])
    assert printed.getvalue().startswith(
        f"imported {SCENES} images and {objects} masks as ground truth (round 0, stage gt) "
        f"into {store}"
    )
    ran = maskmill(*_run_command(store, inputs, auto=True), env={"PREFECT_API_URL": prefect_server})
    assert ran.returncode == 0, ran.stderr[-3000:]
    Store(store).fs.invalidate_cache()  # listed by the import in this process, before the run
    return store


def _cat(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as handle:
        return handle.read()


@pytest.mark.timeout(420)
def test_engine_run_on_s3(engine_store, inputs):
    """The run's masks and rounds, read back by DuckDB over s3fs (hive partitions included)."""
    store = Store(engine_store)
    with Catalog(store) as catalog:
        rounds = catalog.con.execute(
            "SELECT round, stage, images, masks FROM rounds ORDER BY round"
        ).fetchall()
        per_stage = dict(
            catalog.con.execute("SELECT stage, count(*) FROM masks GROUP BY stage").fetchall()
        )
        images = catalog.con.execute("SELECT count(*) FROM images").fetchone()[0]
        distinct = catalog.con.execute("SELECT count(DISTINCT mask_id) FROM masks").fetchone()[0]
        auto_images = catalog.con.execute(
            "SELECT count(DISTINCT image_id) FROM masks WHERE stage = 'auto'"
        ).fetchone()[0]
    # every scene annotated in round 1, and all in the automatic pass (round 2)
    assert images == SCENES
    assert [(r, s, n) for r, s, n, _ in rounds] == [
        (0, "gt", SCENES),
        (1, "manual", SCENES),
        (2, "auto", SCENES),
    ]
    assert {s: m for _, s, _, m in rounds} == per_stage
    assert per_stage["gt"] == len(json.loads(_cat(inputs["annotations"]))["annotations"])
    assert auto_images == SCENES and per_stage["manual"] >= SCENES
    assert distinct == sum(per_stage.values())
    # one shard per image of each stage, under the hive partition folders
    shards = store.shards("masks")
    assert len([p for p in shards if "/round=1/stage=manual/" in p]) == SCENES
    assert len([p for p in shards if "/round=2/stage=auto/" in p]) == SCENES
    # the models table reads meta.json from the bucket; nothing left locked
    assert [m["version"] for m in store.model_metas()] == [1]
    store.fs.invalidate_cache()
    assert store.fs.find(store.path("locks")) == []


@pytest.mark.timeout(420)
def test_stats_and_export_on_s3(engine_store, tmp_path, capsys):
    """``stats`` and ``export`` (the CLI's own entry point, in this process) over the s3 store
    agree with DuckDB's counts and pixels."""
    with Catalog(engine_store) as catalog:
        masks, images = catalog.con.execute(
            "SELECT (SELECT count(*) FROM masks), (SELECT count(*) FROM images)"
        ).fetchone()
        by_stage = dict(
            catalog.con.execute("SELECT stage, count(*) FROM masks GROUP BY stage").fetchall()
        )
    capsys.readouterr()
    assert main(["stats", "--store", engine_store, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert (figures["images"], figures["masks"]) == (images, masks)
    assert {g["stage"]: g["masks"] for g in figures["groups"]} == by_stage

    out = tmp_path / "export.json"
    where = "m.stage = 'auto'"
    assert (
        main(
            [
                "export",
                "--store",
                engine_store,
                "--format",
                "coco",
                "--out",
                str(out),
                "--where",
                where,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith(f"exported {by_stage['auto']} masks of {images} images as coco")
    coco = json.loads(out.read_text())
    assert (len(coco["images"]), len(coco["annotations"])) == (images, by_stage["auto"])
    # the exported pixels are the stored ones
    stored = sorted(row[4] for row in _masks(engine_store, "stage = 'auto'"))
    assert sorted(a["segmentation"]["counts"] for a in coco["annotations"]) == stored


def _get(url: str) -> tuple[int, bytes, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read(), response.headers["content-type"]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.timeout(420)
def test_annotation_page_on_s3(engine_store, tmp_path):
    """``serve`` over the s3 store: the next image (a claim in the bucket), its pixels, a
    click's mask accepted and committed to the bucket, the claim given back on SIGTERM."""
    store = Store(engine_store)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [*MASKMILL, "serve", "--store", engine_store, "--port", str(port)]
    with open(tmp_path / "serve.err", "wb") as err:
        serve = subprocess.Popen(
            [*command, "--annotator", "tester"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert serve.poll() is None, (tmp_path / "serve.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not answer in 300 s"
            try:
                status, body, _ = _get(f"{base}/api/next")
                break
            except OSError:
                time.sleep(0.2)
        state = json.loads(body)
        image_id = state["image"]["image_id"]
        # a new round of the manual stage (rounds 1 and 2 are done), the image claimed in S3
        assert (status, state["round"], state["stage"], state["masks"]) == (200, 3, "manual", [])
        store.fs.invalidate_cache()  # the serve process wrote it: this one's listings are old
        claims = store.fs.find(store.path("locks", "claims", "r3-manual"))
        assert [p.rsplit("/", 1)[1] for p in claims] == [f"{image_id}.json"]

        status, png, kind = _get(f"{base}/api/images/{image_id}")
        with Catalog(store) as catalog:
            width, height = catalog.con.execute(
                "SELECT width, height FROM images WHERE image_id = ?", [image_id]
            ).fetchone()
        with Image.open(io.BytesIO(png)) as image:
            assert (status, kind, image.size) == (200, "image/png", (width, height))

        objects = ground_truth(store)[image_id]
        largest = max(objects, key=lambda o: int(rle.areas([o])[0]))
        x, y = (int(v) for v in interior_point(rle.decode(largest)))
        _post(f"{base}/api/images/{image_id}/predict", {"points": [[x, y, 1]]})
        accepted = _post(f"{base}/api/images/{image_id}/accept", {})
        assert len(accepted["masks"]) == 1
        _post(f"{base}/api/images/{image_id}/next", {})
        stored = _masks(engine_store, "round = 3")
        assert [(m[1], m[3]) for m in stored] == [(image_id, "manual")]
        assert store.has_shard("masks", image_id, 3, "manual")

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 128 + signal.SIGTERM
        store.fs.invalidate_cache()
        assert store.fs.find(store.path("locks", "claims", "r3-manual")) == []
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(timeout=30)


@pytest.mark.timeout(600)
def test_kill_9_mid_stage_and_resume_on_s3(engine_store, inputs, prefect_server):
    """SIGKILL a ``run`` on an s3 store while it holds the claim of an image of the manual round
    after committing another, rerun the command (in this process): the masks are the
    uninterrupted run's (ids and pixels), none missing, none twice; the dead run's claim was
    taken over."""
    expected = _masks(engine_store, "round = 1 AND stage = 'manual'")
    store = Store(s3_url("killed"))
    claims = ImageClaims(store, 1, "manual", owner="checker")

    def claimed() -> set[str]:
        store.fs.invalidate_cache()  # this process's listings of the bucket are old
        return {p.rsplit("/", 1)[1][: -len(".json")] for p in store.fs.glob(f"{claims.folder}/*")}

    command = [*MASKMILL, *_run_command(store.url, inputs, auto=False)]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    run = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 300
        # kill inside the stage: one image committed, the next one claimed and not done
        while run.poll() is None and not (
            (done := set(store.shard_keys("masks", 1, "manual"))) and claimed() - done
        ):
            assert time.monotonic() < deadline, "the run committed nothing in 300 s"
            time.sleep(0.05)
        assert run.poll() is None, f"finished before the kill: {run.stderr.read()[-3000:]}"
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    done = set(store.shard_keys("masks", 1, "manual"))
    held = claimed() - done
    assert 1 <= len(done) < SCENES and held  # killed mid-stage, holding an image's claim
    assert all(claims.holder(image_id) is None for image_id in held)  # its holder is dead

    # the same command again, to the end (in this process, whose environment has the S3
    # variables and whose Prefect is the test server: an attempt less to start)
    assert main(command[len(MASKMILL) :]) == 0
    masks = _masks(store.url, "round = 1 AND stage = 'manual'")
    assert masks == expected
    assert len({m[0] for m in masks}) == len(masks)  # no mask twice
    assert {m[1] for m in masks} == {m[1] for m in expected}  # no image missing
    assert len(store.shard_keys("masks", 1, "manual")) == SCENES
    # no lease left; a claim left by the killed run is of an image it committed, and stale
    # (its holder is gone), so nobody is kept from anything
    store.fs.invalidate_cache()
    left = store.fs.find(store.path("locks"))
    assert all("/locks/claims/r1-manual/" in path for path in left), left
    for path in left:
        image_id = path.rsplit("/", 1)[1][: -len(".json")]
        assert image_id in done and claims.holder(image_id) is None

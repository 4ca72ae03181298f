"""Per-image claims (``storage.claims``) and shared stage writers: many writers on one round and
stage, every image written by one of them, once; faults (expiry races, killed holders) leave
every image done exactly once."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from maskmill.engine.annotators import SimulatedAnnotator
from maskmill.engine.plan import make_plan, model_bytes
from maskmill.engine.stages import assisted_manual
from maskmill.engine.training.synthetic import write_coco
from maskmill.model import build_model
from maskmill.storage import (
    Catalog,
    ClaimLostError,
    ImageClaims,
    ImageDoneError,
    StageWriter,
    Store,
    WriterConflictError,
    import_coco,
    masks_table,
    rle,
)
from maskmill.storage.queries import ground_truth
from tests.test_storage_commit import _run
from tests.test_storage_data import STORE_KINDS, empty_store, records

IDS = [f"img{i}" for i in range(5)]


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path) -> Iterator[Store]:
    yield from empty_store(request.param, tmp_path)


def _shared(store: Store, owner: str, **kwargs) -> StageWriter:
    return StageWriter(store, 1, "manual", owner=owner, shared=True, **kwargs).__enter__()


def _masks(store: Store, round_: int = 1, stage: str = "manual") -> tuple[int, int, list]:
    """(masks, distinct mask ids, [(image_id, masks)]) of a round and stage, by DuckDB."""
    with Catalog(store) as catalog:
        con = catalog.con
        where = "WHERE round = ? AND stage = ?"
        total, distinct = con.execute(
            f"SELECT count(*), count(DISTINCT mask_id) FROM masks {where}", [round_, stage]
        ).fetchone()
        per_image = con.execute(
            f"SELECT image_id, count(*) FROM masks {where} GROUP BY image_id ORDER BY image_id",
            [round_, stage],
        ).fetchall()
    return total, distinct, per_image


def _rounds(store: Store) -> list[tuple]:
    with Catalog(store) as catalog:
        return catalog.con.execute(
            "SELECT round, stage, images, masks FROM rounds WHERE round > 0 ORDER BY round, stage"
        ).fetchall()


def _at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Results of ``calls``, each run on its own thread, all released at the same moment."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _claim_files(store: Store, round_: int = 1, stage: str = "manual") -> list[str]:
    store.fs.invalidate_cache()
    return sorted(store.fs.glob(store.path("locks", "claims", f"r{round_}-{stage}", "*")))


# ------------------------------------------------------------------------------ the claims


def test_two_owners_never_hold_the_same_image(store):
    ana = ImageClaims(store, 1, "manual", "ana")
    ben = ImageClaims(store, 1, "manual", "ben")
    assert ana.claim("img0") is True
    assert ben.claim("img0") is False
    assert ana.claim("img0") is True  # already its own: renewed
    assert ben.claim_next(IDS) == "img1"
    assert ana.claim_next(IDS) == "img0"  # its own comes first, still claimable by it
    assert (ana.held(), ben.held()) == (["img0"], ["img1"])
    assert ben.holder("img0")["owner"] == "ana"
    assert ben.holder("img2") is None
    with pytest.raises(ClaimLostError, match=r"ben lost the claim on image 'img0'.*held by ana"):
        ben.renew("img0")
    ana.release("img0")
    ana.release("img0")  # idempotent
    ben.release("img0")  # not its own: nothing happens
    assert ana.held() == []
    assert ben.claim("img0") is True
    # Claims belong to the owner name: a second object of the same owner shares them.
    assert ImageClaims(store, 1, "manual", "ben").held() == ["img0", "img1"]
    # Another round or stage is another set of images.
    assert ImageClaims(store, 1, "semi", "ana").claim("img0") is True
    assert ImageClaims(store, 2, "manual", "ana").claim("img0") is True
    ben.release_all()
    assert ben.held() == []
    assert ImageClaims(store, 1, "manual", "carl").claim_next(IDS) == "img0"


@pytest.mark.parametrize("stale", [False, True], ids=["free", "expired"])
def test_owners_racing_for_one_image_get_it_once(tmp_path, stale):
    """Eight threads (eight owners) claim one image at the same moment, free or held by an
    expired claim: exactly one gets it, every time."""
    store = Store(str(tmp_path / "store"))
    for attempt in range(30):
        image_id = f"img{attempt}"
        if stale:
            assert ImageClaims(store, 1, "manual", "gone", ttl_s=0.01).claim(image_id)
            time.sleep(0.02)
        owners = [ImageClaims(store, 1, "manual", f"owner{attempt}-{i}") for i in range(8)]
        claimed = _at_once([lambda c=c, i=image_id: c.claim(i) for c in owners])
        won = [c.owner for c, got in zip(owners, claimed, strict=True) if got]
        assert len(won) == 1, (attempt, won)
        assert owners[0].holder(image_id)["owner"] == won[0]
        assert [c.owner for c in owners if c.held() == [image_id]] == won


def test_an_expired_claim_is_taken_over_and_its_first_holder_cannot_write(store):
    slow = _shared(store, "slow", ttl_s=0.2)
    quick = _shared(store, "quick")
    assert slow.claims.claim("img0")
    assert quick.claims.claim("img0") is False  # live
    time.sleep(0.3)
    assert quick.claims.holder("img0") is None  # expired: free
    assert quick.claims.claim("img0")
    with pytest.raises(ClaimLostError, match=r"slow lost the claim on image 'img0'.*by quick \("):
        slow.write_masks("img0", records(2))
    assert store.shards("masks") == []  # nothing written by it
    quick.write_masks("img0", records(3))
    assert _masks(store) == (3, 3, [("img0", 3)])
    assert quick.claims.held() == [] and _claim_files(store) == []  # released on commit
    with pytest.raises(ClaimLostError, match="nobody holds it now"):  # never claimed
        slow.write_masks("img1", records(1))
    assert issubclass(ClaimLostError, WriterConflictError)


def test_two_writers_racing_to_commit_one_image_leave_one_shard(store, monkeypatch):
    """The claim expiry race: ``slow`` passes its claim check, then stalls past its claim's
    expiry before the commit; ``quick`` takes the image over and commits first. ``slow``'s
    commit is refused (ImageDoneError), never replacing ``quick``'s shard."""
    slow = _shared(store, "slow", ttl_s=0.2)
    quick = _shared(store, "quick")
    assert slow.claims.claim("img0")
    renew = slow.claims.renew

    def renew_then_stall(image_id: str) -> None:
        renew(image_id)  # the claim check passes...
        time.sleep(0.3)  # ...then the writer stalls; meanwhile its claim expires
        assert quick.claims.claim(image_id)
        quick.write_masks(image_id, records(3))

    monkeypatch.setattr(slow.claims, "renew", renew_then_stall)
    with pytest.raises(ImageDoneError, match=r"image 'img0' of round 1 stage 'manual'.*done"):
        slow.write_masks("img0", records(2))
    assert len(store.shards("masks")) == 1
    assert _masks(store) == (3, 3, [("img0", 3)])  # quick's masks, whole
    if store.local:
        assert list(Path(store.root).rglob("*.tmp")) == []


def test_exclusive_commits_racing_in_threads_make_one_shard(tmp_path):
    """Eight threads commit the same shard key exclusively at once: one shard, the others
    refused, no temp file left."""
    store = Store(str(tmp_path / "store"))
    tables = [masks_table(records(n + 1), 1, "manual") for n in range(8)]

    def commit(table) -> int | None:
        try:
            store.write_shard("masks", table, "img0", 1, "manual", exclusive=True)
        except FileExistsError:
            return None
        return table.num_rows

    outcomes = _at_once([lambda t=t: commit(t) for t in tables])
    wrote = [rows for rows in outcomes if rows is not None]
    assert len(wrote) == 1 and outcomes.count(None) == 7
    assert _masks(store)[0] == wrote[0]
    assert list((tmp_path / "store").rglob("*.tmp")) == []


def test_claim_next_skips_done_images_and_the_row_waits_for_the_last(store, monkeypatch):
    ana = _shared(store, "ana")
    ben = _shared(store, "ben")
    assert ana.claims.claim_next(IDS) == "img0"
    ana.write_masks("img0", records(2))
    assert ben.claims.claim("img0") is False  # done
    assert ana.claims.claim_next(IDS) == "img1"  # img0 is done
    assert ben.claims.claim_next(IDS) == "img2"  # img1 is held
    # A writer whose claim check passed on a done image: its commit is refused.
    monkeypatch.setattr(ana.claims, "renew", lambda image_id: None)
    with pytest.raises(ImageDoneError, match="image 'img0'"):
        ana.write_masks("img0", records(1))
    monkeypatch.undo()
    assert ana.finish_if_complete(IDS[:3]) is None
    ben.write_failures("img2", [{"image_id": "img2", "error": "unreadable"}])
    assert ben.claims.held() == []  # a failure ends the work on the image too
    assert ana.pending(IDS[:3]) == ["img1"]
    assert ben.finish_if_complete(IDS[:3]) is None
    ana.write_masks("img1", records(3, "img1"))
    row = ana.finish_if_complete(IDS[:3], model_version=4)
    assert (row["images"], row["masks"], row["model_version"]) == (2, 5, 4)
    assert ben.finish_if_complete(IDS[:3]) is not None  # again: the same one row
    assert _rounds(store) == [(1, "manual", 2, 5)]
    assert ben.claims.claim_next(IDS[:3]) == "img2"  # failed: a later run may try it again


def test_a_killed_holder_s_claims_are_taken_and_the_round_completes(tmp_path):
    """A writer SIGKILLed mid-commit while holding claims: its claims are free at once (its
    process is gone), its half-done commit left nothing visible, and another writer completes
    the round with every image done exactly once."""
    store = Store(str(tmp_path / "store"))
    doomed = _run(
        """
        import os, signal, sys
        import maskmill.storage.store
        from maskmill.storage import StageWriter

        def die(tmp, final):  # the injected crash point: img1's temp file is complete
            os.kill(os.getpid(), signal.SIGKILL)

        with StageWriter(sys.argv[1], 1, "manual", "doomed", 600, shared=True) as writer:
            assert writer.claims.claim("img0")
            writer.write_masks("img0", records(2, "img0"))
            assert writer.claims.claim("img1") and writer.claims.claim("img2")
            maskmill.storage.store._link = die
            writer.write_masks("img1", records(4, "img1"))
        """,
        store.url,
    )
    doomed.wait(timeout=60)
    assert doomed.returncode == -signal.SIGKILL, doomed.stderr.read()
    folder = tmp_path / "store/masks/round=1/stage=manual"
    assert len(list(folder.glob(".part-img1.parquet.*.tmp"))) == 1
    assert len(_claim_files(store)) == 2  # img1 and img2 still claimed, by a dead process

    rescuer = _shared(store, "rescuer")  # 120 s claims; the doomed ones were for 600 s
    assert rescuer.claims.holder("img1") is None  # free at once: its holder is gone
    order = []
    while (image_id := rescuer.claims.claim_next(IDS)) is not None:
        order.append(image_id)
        rescuer.write_masks(image_id, records(3, image_id))
    assert order == ["img1", "img2", "img3", "img4"]
    row = rescuer.finish_if_complete(IDS)
    assert (row["images"], row["masks"]) == (5, 2 + 4 * 3)
    assert _masks(store) == (14, 14, [("img0", 2)] + [(i, 3) for i in IDS[1:]])
    assert sorted(store.shard_keys("masks", 1, "manual")) == IDS
    assert list(folder.glob("*.tmp")) == []  # the dead writer's temp file is gone
    rescuer.__exit__(None, None, None)
    assert _claim_files(store) == []


def test_a_run_and_a_person_s_process_each_release_their_claims_on_exit(store):
    with StageWriter(store, 1, "manual", owner="web:ana", shared=True) as ana:
        assert ana.claims.claim("img0") and ana.claims.claim("img1")
        assert ana.lease is None  # no round-wide lease: a second shared writer is welcome
        with StageWriter(store, 1, "manual", shared=True) as run:
            assert run.claims.claim_next(IDS) == "img2"
    assert _claim_files(store) == []


# ------------------------------------------------------------------ the annotation stages


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("claims-scenes")
    annotations = write_coco(folder, 4, seed=21, height=96, width=128, parts=False)
    return str(folder / "images"), str(annotations)


def _engine_store(path: Path, scenes: tuple[str, str]):
    """A store with ground truth and model v1, the round's image ids and the model's meta."""
    import_coco(scenes[1], scenes[0], str(path))
    store = Store(str(path))
    store.write_model(1, model_bytes(build_model("tiny", seed=0), {"round": 0}), {"round": 0})
    plan = make_plan(store, 1, 0, auto=False, holdout=0)
    return store, plan, plan.manual[0], store.model_metas()[-1]


def _annotator(store: Store) -> SimulatedAnnotator:
    truth = ground_truth(store)
    return SimulatedAnnotator(lambda image_id: truth.get(image_id, []), max_clicks=3)


def test_two_annotation_stages_share_a_round(tmp_path, scenes):
    """Two simulated annotators run round 1 (manual) at once: each image is annotated once,
    one rounds row, and the masks are those of one run alone."""
    alone, plan, ids, meta = _engine_store(tmp_path / "alone", scenes)
    assisted_manual(alone, 1, plan, ids, meta, _annotator(alone))
    expected = _masks(alone)

    store, plan, ids, meta = _engine_store(tmp_path / "shared", scenes)
    rows: list[dict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            rows.append(assisted_manual(store, 1, plan, ids, meta, _annotator(store)))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert errors == []
    assert len(ids) == 4 and [r["images"] for r in rows] == [4, 4]
    assert sorted(store.shard_keys("masks", 1, "manual")) == sorted(ids)
    total, distinct, per_image = _masks(store)
    assert total == distinct == expected[0] > 0
    assert per_image == expected[2]
    assert _rounds(store) == [(1, "manual", 4, expected[0])]
    assert _claim_files(store) == []


def test_a_finished_stage_reruns_as_its_row_until_a_person_commits_again(tmp_path, scenes):
    """Rerunning a finished stage returns its stored rounds row and writes nothing (same row,
    same finished_at). A person who kept the claim of an image (done since their first commit)
    commits it again after the row: the next rerun counts again, and writes the new row."""
    store, plan, ids, meta = _engine_store(tmp_path / "store", scenes)
    info = plan.images[ids[0]]

    def squares(n: int) -> list[dict]:
        out = []
        for index in range(n):
            mask = np.zeros((info.height, info.width), bool)
            mask[10 * index : 10 * index + 8, 5:20] = True
            out.append({"image_id": ids[0], "segmentation": rle.encode(mask), "index": index})
        return out

    def round_rows() -> list[dict]:  # round 0: the ground-truth import's
        return [r for r in store.read_table("rounds").to_pylist() if r["round"] == 1]

    person = _shared(store, "web:ana")
    assert person.claims.claim(ids[0])
    person.write_masks(ids[0], squares(1), keep_claim=True, source="web:ana")
    row = assisted_manual(store, 1, plan, ids, meta, _annotator(store))
    assert row["images"] == 4 and row["masks"] > 1
    assert round_rows() == [row]
    assert assisted_manual(store, 1, plan, ids, meta, _annotator(store)) == row
    assert round_rows() == [row]  # unchanged: same row, same finished_at

    time.sleep(0.05)  # the person's commit is later than the row by the store's clock
    person.write_masks(ids[0], squares(2), keep_claim=True, source="web:ana")
    again = assisted_manual(store, 1, plan, ids, meta, _annotator(store))
    assert again["masks"] == row["masks"] + 1 and again["finished_at"] > row["finished_at"]
    assert round_rows() == [again]
    assert assisted_manual(store, 1, plan, ids, meta, _annotator(store)) == again
    person.__exit__(None, None, None)


def test_a_stage_waits_for_a_person_s_image_and_then_completes_the_round(tmp_path, scenes):
    """A person holds one image of the round; the simulated stage annotates the others, waits
    for that one, and writes the row once the person commits it."""
    store, plan, ids, meta = _engine_store(tmp_path / "store", scenes)
    person = _shared(store, "web:ana")
    assert person.claims.claim(ids[0])
    rows: list[dict] = []
    stage = threading.Thread(
        target=lambda: rows.append(assisted_manual(store, 1, plan, ids, meta, _annotator(store)))
    )
    stage.start()
    deadline = time.monotonic() + 300
    while person.pending(ids) != [ids[0]]:
        assert time.monotonic() < deadline and stage.is_alive()
        time.sleep(0.2)
    time.sleep(0.5)
    assert stage.is_alive() and _rounds(store) == []  # waiting for the person's image

    info = plan.images[ids[0]]
    mask = np.zeros((info.height, info.width), bool)
    mask[10:30, 20:50] = True
    person.write_masks(
        ids[0],
        [{"image_id": ids[0], "segmentation": rle.encode(mask), "source": "web:ana"}],
    )
    stage.join(timeout=60)
    assert not stage.is_alive()
    _, _, per_image = _masks(store)
    assert [image_id for image_id, _ in per_image] == sorted(ids)
    assert dict(per_image)[ids[0]] == 1
    assert rows[0]["images"] == 4 and _rounds(store) == [(1, "manual", 4, rows[0]["masks"])]
    with Catalog(store) as catalog:
        sources = catalog.con.execute(
            "SELECT source, count(*) FROM masks WHERE round = 1 GROUP BY source ORDER BY 1"
        ).fetchall()
    assert sources[1] == ("web:ana", 1) and sources[0][0] == "simulated"

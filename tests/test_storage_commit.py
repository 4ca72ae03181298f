"""The commit protocol and writer leases: whole shards or none, reruns replace, one writer."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskmill.storage import Catalog, StageWriter, StorageError, Store, WriterConflictError, rle
from tests.test_storage_data import STORE_KINDS, empty_store, records

REPO = Path(__file__).resolve().parents[1]
PRELUDE = "from tests.test_storage_data import records\n"


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path) -> Iterator[Store]:
    yield from empty_store(request.param, tmp_path)


def _run(script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script), *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _count(s: Store) -> int:
    with Catalog(s) as catalog:
        return catalog.con.execute("SELECT count(*) FROM masks").fetchone()[0]


def test_rerun_replaces_its_shard(store):
    with StageWriter(store, 1, "auto") as writer:
        writer.write_masks("batch-0", records(3))
        writer.write_masks("batch-0", records(5))  # the same unit of work again
        writer.write_masks("batch-1", records(2, "img1"))
        assert writer.done("batch-0") and not writer.done("batch-2")
    assert _count(store) == 7
    assert len(store.shards("masks")) == 2


def test_writer_killed_before_rename_leaves_no_partial_shard(tmp_path):
    """SIGKILL between the temp write and the rename: the old shard stays whole, the temp file
    is never read, and the next writer takes over the dead writer's lease and cleans up."""
    local = Store(str(tmp_path / "store"))
    with StageWriter(local, 1, "auto") as writer:
        writer.write_masks("batch-0", records(2))
    before = (tmp_path / "store/masks/round=1/stage=auto/part-batch-0.parquet").read_bytes()

    crash = _run(
        """
        import os, signal, sys
        import maskmill.storage.store
        from maskmill.storage import StageWriter

        def die(tmp, final):  # the injected crash point: the temp file is complete
            os.kill(os.getpid(), signal.SIGKILL)

        maskmill.storage.store._move = die
        with StageWriter(sys.argv[1], 1, "auto") as writer:
            writer.write_masks("batch-0", records(5))
        """,
        local.url,
    )
    crash.wait(timeout=60)
    assert crash.returncode == -signal.SIGKILL, crash.stderr.read()

    folder = tmp_path / "store/masks/round=1/stage=auto"
    assert len(list(folder.glob(".part-batch-0.parquet.*.tmp"))) == 1  # died after the write
    assert (folder / "part-batch-0.parquet").read_bytes() == before
    assert _count(local) == 2  # readers see the old shard, whole

    with StageWriter(local, 1, "auto") as writer:  # the dead writer's lease is stale
        assert list(folder.glob("*.tmp")) == []
        writer.write_masks("batch-0", records(5))
    assert _count(local) == 5


def test_next_writer_removes_its_own_stage_temp_files_only(tmp_path):
    """A writer killed while committing its failures or its rounds row leaves temp files there;
    the stage's next writer removes them, and leaves other stages' (maybe live) ones alone."""
    local = Store(str(tmp_path / "store"))
    own = ["rounds/.part-r1-auto.parquet.aa.tmp", "failures/.part-r1-auto-img.parquet.bb.tmp"]
    others = [
        "rounds/.part-r1-semi.parquet.cc.tmp",
        "rounds/.part-r11-auto.parquet.dd.tmp",
        "failures/.part-r2-auto-img.parquet.ee.tmp",
    ]
    for name in own + others:
        (tmp_path / "store" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "store" / name).write_bytes(b"half a shard")
    with StageWriter(local, 1, "auto"):
        left = sorted(str(p.relative_to(tmp_path / "store")) for p in tmp_path.rglob("*.tmp"))
    assert left == sorted(others)


def test_writer_killed_at_any_moment_leaves_only_whole_shards(tmp_path):
    """A writer committing shards in a loop is SIGKILLed mid-way: every visible shard reads
    back complete."""
    local = Store(str(tmp_path / "store"))
    writer = _run(
        """
        import sys
        from maskmill.storage import StageWriter, masks_table

        table = masks_table(records(3000), 2, "auto")
        with StageWriter(sys.argv[1], 2, "auto") as writer:
            for i in range(10_000):
                writer.write_masks(f"batch-{i}", table)
                if i == 2:
                    print("writing", flush=True)
        """,
        local.url,
    )
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    shards = local.shards("masks")
    assert len(shards) >= 3
    for path in shards:
        assert pq.read_metadata(path).num_rows == 3000
    assert _count(local) == 3000 * len(shards)


def test_second_writer_of_a_stage_is_refused(store):
    with StageWriter(store, 1, "auto", owner="first") as writer:
        with pytest.raises(WriterConflictError, match=r"round 1 stage 'auto'.*by first"):
            StageWriter(store, 1, "auto", owner="second").__enter__()
        with StageWriter(store, 1, "semi") as other:  # another stage is fine
            other.write_masks("batch-0", records(1))
        writer.write_masks("batch-0", records(1))  # the holder still writes
    with StageWriter(store, 1, "auto", owner="second") as writer:  # released: free again
        writer.write_masks("batch-1", records(1))
    assert _count(store) == 3


def test_writer_in_another_process_is_refused(tmp_path):
    local = Store(str(tmp_path / "store"))
    holder = _run(
        """
        import sys
        from maskmill.storage import StageWriter

        with StageWriter(sys.argv[1], 3, "manual", owner="annotator-7"):
            print("holding", flush=True)
            sys.stdin.readline()
        """,
        local.url,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(WriterConflictError, match=f"annotator-7.*pid {holder.pid}"):
            StageWriter(local, 3, "manual").__enter__()
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    with StageWriter(local, 3, "manual") as writer:
        writer.write_masks("batch-0", records(1))


def test_expired_lease_is_taken_over_and_the_old_writer_stops(store):
    old = StageWriter(store, 1, "auto", owner="slow", ttl_s=0.2).__enter__()
    time.sleep(0.3)
    with StageWriter(store, 1, "auto", owner="new") as new:
        with pytest.raises(WriterConflictError, match="lost the writer lease"):
            old.write_masks("batch-0", records(1))
        new.write_masks("batch-0", records(2))
    assert _count(store) == 2


def test_bad_keys_and_tables_are_refused(store):
    with StageWriter(store, 1, "auto") as writer:
        with pytest.raises(StorageError, match="not usable in a file name"):
            writer.write_masks("../escape", records(1))
        with pytest.raises(StorageError, match="does not fit the masks schema"):
            writer.write_masks("batch-0", pa.table({"mask_id": ["x"]}))
    with pytest.raises(StorageError, match="not usable in a file name"):
        StageWriter(store, 1, "auto/../x")
    assert store.shards("masks") == []


def test_mask_ids_are_deterministic():
    assert rle.mask_id("img", 1, "auto", 0) == rle.mask_id("img", 1, "auto", 0)
    ids = {rle.mask_id("img", r, s, i) for r in (0, 1) for s in ("gt", "auto") for i in range(3)}
    assert len(ids) == 12
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    assert rle.decode(rle.encode(mask)).tolist() == mask.tolist()

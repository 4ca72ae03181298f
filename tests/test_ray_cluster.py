"""The automatic stage and retraining on a Ray cluster of several nodes, and one node lost
mid-stage.

A real ``ray.cluster_utils.Cluster`` on this machine: a head with no CPUs (so no actor lands
there) and two worker nodes of one CPU each. It cannot share a process with the suite's
``ray_cluster`` fixture (one Ray per process), so the scenario runs in a subprocess: this file
run as a script (``python tests/test_ray_cluster.py STORE OUT``), which starts the cluster,
runs the stages, stops the cluster and writes what it saw as JSON for the test to check.

Round 1: two actors, spread over the two worker nodes (``WorkerPool``'s ``SPREAD``). Round 2:
the same images again, and a worker node removed as soon as the first image commits: the pool
resubmits the lost actor's images to the surviving actor (no Ray actor restart, no flow
retry), and every image ends with its masks exactly once, the same masks as round 1's.
Retraining: a node of two CPUs joins beside the survivor's one, and a retrain on the ground
truth runs two Ray Train workers: ``PACK`` would put both on the new node, the retrain's
``SPREAD`` puts one on each, which its stored model's metrics show (``train_worker_nodes`` 2,
``train_node_ids`` those two nodes).

The model is a ``tiny`` one with fixed random weights (every mask kept: what is checked is
where and how often the work ran, not quality); the scenes are generated.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from maskmill.engine.plan import make_plan, model_bytes
from maskmill.engine.training.retrain import RetrainConfig
from maskmill.engine.training.synthetic import write_coco
from maskmill.model import build_model, load_checkpoint
from maskmill.storage import Catalog, Store, import_coco

IMAGES = 10
# A small grid, every mask kept (a random model's scores are low), no embedding cache so both
# rounds compute the same thing from scratch.
OPTIONS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
# The smallest retrain that trains: two steps, one mask a draw, the encoder frozen, no heads.
RETRAIN = RetrainConfig(
    steps=2,
    workers=2,
    masks_per_image=1,
    encoder_blocks=0,
    stages=("gt",),
    concepts=False,
    embedding_cache=False,
)
SCENARIO_TIMEOUT_S = 300


def make_store(root: Path) -> Store:
    """A store of ``IMAGES`` generated scenes (ground truth imported) with a tiny model v1."""
    annotations = write_coco(root / "scenes", IMAGES, seed=5, height=192, width=256, parts=False)
    store = Store(str(root / "store"))
    import_coco(str(annotations), str(root / "scenes" / "images"), store)
    model = build_model("tiny", seed=0)
    store.write_model(1, model_bytes(model, {}), {"round": 0, "config": model.config.to_dict()})
    return store


def scenario(store_url: str, out: str) -> None:
    """The subprocess: start a 3-node cluster, run rounds 1 and 2 (a node removed during
    round 2), add a 2-CPU node and retrain after round 2, stop the cluster, write the rounds'
    metrics, the new model's meta and node ids to ``out``."""
    import ray
    from ray.cluster_utils import Cluster

    from maskmill.engine.stages import fully_automatic
    from maskmill.engine.training.retrain import retrain

    store = Store(store_url)
    plan = make_plan(store, 0, 0, True, seed=0, holdout=0.0)
    meta = store.model_metas()[-1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    report: dict = {"worker_nodes": sorted(node.node_id for node in workers)}
    try:
        row = fully_automatic(store, 1, plan, plan.auto, meta, 2, OPTIONS, embedding_cache=False)
        report["round1"] = json.loads(row["metrics"])

        removed: dict = {}

        def remove_after_first_commit() -> None:
            # Poll the store as any observer would: the first committed image of round 2.
            deadline = time.monotonic() + SCENARIO_TIMEOUT_S
            while not store.shard_keys("masks", 2, "auto") and time.monotonic() < deadline:
                time.sleep(0.05)
            removed["done_before"] = len(store.shard_keys("masks", 2, "auto"))
            cluster.remove_node(workers[1])
            removed["node_id"] = workers[1].node_id

        killer = threading.Thread(target=remove_after_first_commit, daemon=True)
        killer.start()
        row = fully_automatic(store, 2, plan, plan.auto, meta, 2, OPTIONS, embedding_cache=False)
        killer.join(timeout=60)
        report["round2"] = json.loads(row["metrics"])
        report["removed"] = removed

        joined = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        # Round 2's actors are killed asynchronously: wait until their CPUs are free, or the
        # spread would have only the new node to go to.
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        report["retrain_nodes"] = sorted([workers[0].node_id, joined.node_id])
        report["retrained"] = retrain(store, 2, plan, meta, RETRAIN)
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(out).write_text(json.dumps(report))


def run_scenario(tmp_path: Path) -> tuple[Store, dict]:
    store = make_store(tmp_path)
    out = tmp_path / "report.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, __file__, store.url, str(out)],
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    report["seconds"] = time.monotonic() - started
    return store, report


@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 60)
def test_stages_and_retraining_spread_over_nodes_and_a_lost_node_loses_no_image(tmp_path):
    store, report = run_scenario(tmp_path)
    first, second = report["round1"], report["round2"]

    # Round 1: the two actors ran on the two worker nodes (the head has no CPU).
    assert first["workers"] == 2 and first["worker_nodes"] == 2
    assert first["workers_lost"] == 0 and first["jobs_resubmitted"] == 0
    assert first["images"] == IMAGES

    # Round 2: the node went while images were left; its actor's jobs went to the other one.
    assert report["removed"]["node_id"] in report["worker_nodes"]
    assert 1 <= report["removed"]["done_before"] < IMAGES
    assert second["worker_nodes"] == 2
    assert second["workers_lost"] == 1
    assert second["jobs_resubmitted"] >= 1
    assert second["images"] == IMAGES and second["failures"] == 0

    with Catalog(store) as catalog:
        _, rows = catalog.query(
            "SELECT round, count(*), count(DISTINCT mask_id), count(DISTINCT image_id) "
            "FROM masks WHERE stage = 'auto' GROUP BY round ORDER BY round"
        )
        _, differing = catalog.query(
            """SELECT count(*) FROM (
                   SELECT image_id, list(segmentation ORDER BY segmentation) AS s
                   FROM masks WHERE stage = 'auto' AND round = 1 GROUP BY image_id) a
               FULL JOIN (
                   SELECT image_id, list(segmentation ORDER BY segmentation) AS s
                   FROM masks WHERE stage = 'auto' AND round = 2 GROUP BY image_id) b
               USING (image_id) WHERE a.s IS DISTINCT FROM b.s"""
        )
    (r1, masks1, ids1, images1), (r2, masks2, ids2, images2) = rows
    # Every image once: no mask twice, none missing, the same masks as the undisturbed round.
    assert (r1, r2) == (1, 2)
    assert masks1 == ids1 and masks2 == ids2 and masks1 == masks2 > 0
    assert images1 == images2 == IMAGES
    assert differing == [(0,)]
    assert second["masks"] == first["masks"] == masks1
    assert store.shard_keys("masks", 2, "auto") == store.shard_keys("masks", 1, "auto")

    # Retraining: its two Ray Train workers ran on two nodes, the survivor and the new one
    # (the new one alone had the CPUs for both), and the stored version says so.
    trained = report["retrained"]["metrics"]
    assert trained["workers"] == 2 and trained["steps"] == 2
    assert trained["train_worker_nodes"] == 2
    assert trained["train_node_ids"] == report["retrain_nodes"]
    assert trained["train_images"] == IMAGES and trained["train_loss_first"] > 0
    stored = {int(m["version"]): m for m in store.model_metas()}
    assert sorted(stored) == [1, 2]
    assert (stored[2]["source"], stored[2]["round"], stored[2]["base_version"]) == (
        "retrain",
        2,
        1,
    )
    assert stored[2]["metrics"]["train_worker_nodes"] == 2
    assert load_checkpoint(stored[2]["uri"]).config.name == "tiny"


if __name__ == "__main__":
    scenario(sys.argv[1], sys.argv[2])

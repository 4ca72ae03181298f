"""Prefect flows of the data engine: ``data_engine`` chains ``annotate_round`` and ``retrain``
sub-flows and ends with ``stats``. Each wraps one idempotent engine step (``engine.run``) in a
task with retries, so a failed attempt, or a killed run started again, continues where the store
says it stopped.

Prefect: a temporary local server by default (nothing to set up); ``PREFECT_API_URL`` points
the flows at a real one. Ray: a local cluster by default; ``ray_address`` joins an existing one.
Deployments: ``prefect.yaml`` at the repository root.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from maskmill.engine.report import COLUMNS, format_rounds, markdown_rounds, rounds_table
from maskmill.engine.run import EngineSettings, plan_of, prepare, retrain_after
from maskmill.engine.run import annotate_round as annotate_step

# A stage or a retrain that fails part-way is retried; the store makes the retry skip what the
# failed attempt finished. NO_CACHE: the store, not Prefect's result cache, says what is done.
TASK_OPTIONS: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 2, "cache_policy": NO_CACHE}


@task(name="prepare-store", **TASK_OPTIONS)
def prepare_task(settings: dict[str, Any]) -> dict[str, Any]:
    return prepare(EngineSettings.from_dict(settings))


@task(name="run-stage", **TASK_OPTIONS)
def stage_task(settings: dict[str, Any], round_: int) -> dict[str, Any]:
    return _jsonable(annotate_step(EngineSettings.from_dict(settings), round_))


@task(name="train-next-model", **TASK_OPTIONS)
def retrain_task(settings: dict[str, Any], round_: int) -> dict[str, Any] | None:
    return retrain_after(EngineSettings.from_dict(settings), round_)


@flow(name="annotate_round")
def annotate_round(settings: dict[str, Any], round_: int) -> dict[str, Any]:
    """One round of the plan (manual, semi or auto, as the plan says) with the newest model."""
    row = stage_task(settings, round_)
    metrics = json.loads(row.get("metrics") or "{}")
    get_run_logger().info(
        "round %s %s: %s images, %s masks, %s failures",
        round_,
        row["stage"],
        metrics.get("images"),
        row["masks"],
        metrics.get("failures"),
    )
    return row


@flow(name="retrain")
def retrain(settings: dict[str, Any], round_: int) -> dict[str, Any] | None:
    """Train the next model version on the masks up to round ``round_``."""
    meta = retrain_task(settings, round_)
    if meta is not None:
        metrics = meta.get("metrics") or {}
        get_run_logger().info(
            "model v%s after round %s: held-out 1-click mIoU %s",
            meta["version"],
            round_,
            metrics.get("heldout_miou"),
        )
    return meta


@flow(name="stats")
def stats(store: str) -> list[dict[str, Any]]:
    """The per-round table of a store, also published as Prefect artifacts (a table and a
    Markdown version) under the key ``rounds``."""
    rows = rounds_table(store)
    table = [{title: row.get(key) for key, title, _ in COLUMNS} for row in rows]
    create_table_artifact(table, key="rounds", description=f"Data-engine rounds of {store}")
    create_markdown_artifact(
        f"## Data-engine rounds\n\nstore: `{store}`\n\n{markdown_rounds(rows)}\n",
        key="rounds-markdown",
        description=f"Data-engine rounds of {store}",
    )
    get_run_logger().info("rounds of %s:\n%s", store, format_rounds(rows))
    return rows


@flow(name="data_engine")
def data_engine(
    store: str | None = None,
    images: str | None = None,
    annotations: str | None = None,
    checkpoint: str | None = None,
    manual_rounds: int = 2,
    semi_rounds: int = 1,
    auto: bool = True,
    seed: int = 0,
    workers: int = 2,
    ray_address: str | None = None,
    retrain_steps: int = 10,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The whole engine: assisted-manual rounds (retrain after each), semi-automatic rounds
    (retrain after each), one fully automatic pass, then the rounds table.

    With no arguments: generated scenes with ground truth, the shipped model, a store under
    ``out/engine``. ``options``: further ``EngineSettings`` fields (``holdout``,
    ``accept_iou``, ``points_per_side``, ``progress``, ...).
    """
    settings = EngineSettings(
        **({"store": store} if store else {}),
        images=images,
        annotations=annotations,
        checkpoint=checkpoint,
        manual_rounds=manual_rounds,
        semi_rounds=semi_rounds,
        auto=auto,
        seed=seed,
        workers=workers,
        ray_address=ray_address,
        retrain_steps=retrain_steps,
        **(options or {}),
    ).to_dict()
    logger = get_run_logger()
    logger.info("store ready: %s", prepare_task(settings))
    plan = plan_of(EngineSettings.from_dict(settings))
    for round_, stage, _ in plan.rounds():
        annotate_round(settings, round_)
        if stage != "auto":
            retrain(settings, round_)
    return stats(settings["store"])


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A rounds row with its timestamps as ISO strings (Prefect results and logs)."""
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()}

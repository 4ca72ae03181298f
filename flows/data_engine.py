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

from maskmill.engine.report import (
    COLUMNS,
    auto_stage_warning,
    format_rounds,
    markdown_rounds,
    rounds_table,
)
from maskmill.engine.run import EngineSettings, plan_of, prepare, retrain_after
from maskmill.engine.run import annotate_round as annotate_step

# A stage or a retrain that fails part-way is retried; the store makes the retry skip what the
# failed attempt finished. NO_CACHE: the store, not Prefect's result cache, says what is done.
TASK_OPTIONS: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 2, "cache_policy": NO_CACHE}


@task(name="prepare-store", **TASK_OPTIONS)
def prepare_task(settings: EngineSettings) -> dict[str, Any]:
    return prepare(settings)


@task(name="run-stage", **TASK_OPTIONS)
def stage_task(settings: EngineSettings, round_: int) -> dict[str, Any]:
    return _jsonable(annotate_step(settings, round_))


@task(name="train-next-model", **TASK_OPTIONS)
def retrain_task(settings: EngineSettings, round_: int) -> dict[str, Any] | None:
    return retrain_after(settings, round_)


@flow(name="annotate_round")
def annotate_round(settings: EngineSettings, round_: int) -> dict[str, Any]:
    """One round of the plan (manual, semi or auto, as the plan says) with the newest model.

    Args:
        settings: the run's settings (the same as its ``data_engine`` run's).
        round_: the round to run, 1-based as in the rounds table.
    """
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
def retrain(settings: EngineSettings, round_: int) -> dict[str, Any] | None:
    """Train the next model version on the masks up to round ``round_``.

    Args:
        settings: the run's settings (the same as its ``data_engine`` run's).
        round_: the last round whose masks the new model is trained on.
    """
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
    logger = get_run_logger()
    logger.info("rounds of %s:\n%s", store, format_rounds(rows))
    warning = auto_stage_warning(rows)
    if warning:
        logger.warning(warning)
    return rows


@flow(name="data_engine")
def data_engine(
    # An instance as the default, so a deployment's form shows each field's default; the flow
    # never mutates it.
    settings: EngineSettings = EngineSettings(),  # noqa: B008
) -> list[dict[str, Any]]:
    """The whole engine: assisted-manual rounds (retrain after each), semi-automatic rounds
    (retrain after each), one fully automatic pass, then the rounds table.

    With the default settings: generated scenes with ground truth, the shipped model, a store
    under ``out/engine``.

    Args:
        settings: the run's settings; a dict of some of its fields is validated into one (a
            deployment's parameters), the others keep their defaults.
    """
    logger = get_run_logger()
    logger.info("store ready: %s", prepare_task(settings))
    for round_, stage, _ in plan_of(settings).rounds():
        annotate_round(settings, round_)
        if stage != "auto":
            retrain(settings, round_)
    return stats(settings.store)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A rounds row with its timestamps as ISO strings (Prefect results and logs)."""
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()}

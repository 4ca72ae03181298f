"""Shared fixtures: small models and images the suite makes itself."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import settings

from maskmill.engine.training.synthetic import photo_like
from maskmill.model import Predictor, build_model

# CI runs the same examples every time, so a red build is reproducible.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module (restored after it); a module of many small ops (a
    head's training steps, decoder passes of a few prompts) uses it with ``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``. On a 2-core machine that also runs other
    processes (the session's Ray cluster, a parallel job), two OpenMP threads wait for each
    other at every op; measured on such a machine, 200 steps of a concept head took 60 s on
    two threads and 2 s on one, a scene's concept candidates 18 s and 11 s, and the CLIP test's
    text head 25 s and 4 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_arguments(settings: dict[str, Any]) -> list[str]:
    """``maskmill run`` and its options (the arguments after ``maskmill``) for the
    ``EngineSettings`` fields in ``settings``: ``--field-name value`` for each field not at its
    default, ``--no-...``/``--...`` for a boolean, one ``--prefill-concept`` a concept, the
    ``generator_options`` entries as their own options, ``progress`` off as ``--quiet``.

    Checked by parsing the arguments back with the command's own parser: they must give exactly
    the settings ``settings`` validates into, so a test that compares a command-line run with an
    in-process one compares runs of the same settings (a field ``maskmill run`` has no option
    for, at other than its default, is an error)."""
    from maskmill.engine.run import EngineSettings
    from maskmill.flows.cli import build_parser
    from maskmill.flows.cli_engine import settings_values

    defaults = EngineSettings().model_dump()
    arguments = ["run"]
    for name, value in {**settings, **settings.get("generator_options", {})}.items():
        flag = "--" + name.replace("_", "-")
        if name == "generator_options" or value == defaults.get(name, object()):
            continue
        if name == "progress" and value is False:
            arguments.append("--quiet")
        elif value is True or value is False:
            arguments.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            arguments += [part for item in value for part in (flag[:-1], str(item))]
        else:
            arguments += [flag, str(value)]
    wanted = EngineSettings.model_validate(settings)
    try:
        parsed = build_parser().parse_args(arguments)
    except SystemExit as error:  # argparse's way of saying it (on stderr)
        raise ValueError(f"maskmill run cannot take {arguments}") from error
    given = EngineSettings.model_validate(settings_values(parsed))
    if given != wanted:
        raise ValueError(f"maskmill {' '.join(arguments)} gives {given!r}, not {wanted!r}")
    return arguments


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (``prefect_test_harness``: a temporary SQLite database) for the
    session, started by the first test that needs it: this process's flow runs use it, and a
    ``maskmill`` process given its URL as ``PREFECT_API_URL`` does too; yields that URL. One
    for the session: each start costs 20-60 s on a busy 2-core machine."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for the whole session; yields its GCS address."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model():
    """A ``tiny`` model with fixed random weights."""
    return build_model("tiny", seed=0)


@pytest.fixture(scope="session")
def photo():
    return photo_like(300, 420, seed=3)


@pytest.fixture()
def tiny_predictor(tiny_model, photo):
    predictor = Predictor(tiny_model)
    predictor.set_image(photo)
    return predictor

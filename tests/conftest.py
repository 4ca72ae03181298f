"""Shared fixtures: small models and images the suite makes itself."""

from __future__ import annotations

import os
from collections.abc import Iterator

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

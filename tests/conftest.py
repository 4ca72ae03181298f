"""Shared fixtures: small models and images the suite makes itself."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from maskmill.engine.training.synthetic import photo_like
from maskmill.model import Predictor, build_model

# CI runs the same examples every time, so a red build is reproducible.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


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

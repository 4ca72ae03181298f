"""Shared fixtures: small models and images the suite makes itself."""

from __future__ import annotations

import pytest

from model import Predictor, build_model
from tests.images import photo_like


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

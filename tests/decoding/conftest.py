"""Fixtures of the decoding tests: a random-weight `tiny` model and copy-task sources."""

import pytest

from tests.decoding.copy_model import copy_sources, random_model


@pytest.fixture(scope="module")
def model():
    """Random weights: every property checked on it holds for any weights."""
    return random_model()


@pytest.fixture(scope="module")
def sources(model):
    return copy_sources(model.config, 6)

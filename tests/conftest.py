"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real corpora: ``$KT_DATA_DIR`` or ``../shared/data`` next to the repository."""
    path = Path(
        os.environ.get(
            "KT_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
        )
    )
    if not path.is_dir():
        pytest.skip(f"shared data directory not found: {path} (set KT_DATA_DIR)")
    return path.resolve()

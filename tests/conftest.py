"""Shared fixtures: where the real public data sets live, and how their absence is handled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(
    os.environ.get("ONEREC_SHARED_DATA", Path(__file__).parents[1] / ".." / "shared" / "data")
)


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/data/<name>``.

    CI (``CI=true``) must have the data beside the checkout, so absence fails there; on a
    developer machine without it the test is skipped with the reason.
    """
    path = (SHARED_DATA / name).resolve()
    if not path.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared data set {path} is missing")
        pytest.skip(f"shared data set {path} is not present")
    return path


@pytest.fixture
def ml_latest_small() -> Path:
    return shared_dataset("ml-latest-small")


@pytest.fixture
def kuairand_sample() -> Path:
    return shared_dataset("kuairand-sample")

"""Shared test fixtures: where the real data sets live, and skipping when they are absent."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DETECTOR_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path inside ../shared/data, skipping the test (with the reason) when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (see ../shared/data/README.md)")
    return p


@pytest.fixture
def shared_data():
    return shared_path

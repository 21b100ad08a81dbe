"""Session fixtures shared by the tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One data cache for the whole session; the fixture corpus is prepared once, on first use."""
    root = tmp_path_factory.mktemp("data")
    os.environ["TRISTAGE_DATA_ROOT"] = str(root)
    return root


@pytest.fixture(autouse=True)
def _restore_environment():
    """Tests that start process groups in-process set MASTER_ADDR/PORT & co.; later tests must not inherit them."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)

"""Shared fixtures: one model cache per test session, so the built-in tiny model is built once, for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache for this session (a new user's machine); Ray workers inherit it through the environment."""
    cache = Path(os.environ.get("PEFTSWEEP_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["PEFTSWEEP_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache: Path) -> Path:
    from trainers.tiny_model import ensure_tiny_model

    return ensure_tiny_model(model_cache)


def peftsweep(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real `peftsweep` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "hpo.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )

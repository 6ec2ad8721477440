"""Fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.serve_helpers import make_plain_run, run_server


@pytest.fixture(scope="session")
def plain_run_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """make_plain_run's best/ (a run trained on plain text) served, for the serving and web page tests that only ask
    it (a server start is seconds): its base URL."""
    root = tmp_path_factory.mktemp("plain-run")
    with run_server(make_plain_run(root), root / "serve.log") as base:
        yield base

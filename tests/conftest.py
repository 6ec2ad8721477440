"""Fixtures shared across test modules."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve_helpers import make_plain_run, run_server

CACHES = pytest.StashKey[Path]()
_caches = pytest.MonkeyPatch()  # the environment as the session found it, put back as it ends


def pytest_configure(config: pytest.Config) -> None:
    """What the suite and the programs it starts cache (nanoqwen's built tokenizer and downloaded corpus, pip,
    Hugging Face datasets, matplotlib, W&B's logs, tiktoken) goes to a folder of this session's, not the user's
    ~/.cache and ~/.config. Set here, before the test modules import the libraries that read these at import."""
    root = Path(tempfile.mkdtemp(prefix="nanoqwen-tests-caches-"))
    config.stash[CACHES] = root
    _caches.delenv("NANOQWEN_CACHE", raising=False)  # a user's own: its default, under XDG_CACHE_HOME, is used
    for name in ("HF_HOME", "HF_DATASETS_CACHE", "MPLCONFIGDIR"):  # set, these would win over XDG_CACHE_HOME
        _caches.delenv(name, raising=False)
    _caches.setenv("XDG_CACHE_HOME", str(root / "cache"))
    _caches.setenv("XDG_CONFIG_HOME", str(root / "config"))
    _caches.setenv("TIKTOKEN_CACHE_DIR", str(root / "cache" / "tiktoken"))  # else $TMPDIR/data-gym-cache
    # never the hub, whichever test files run (test_data.py set these for all, only when it was collected)
    _caches.setenv("HF_HUB_OFFLINE", "1")
    _caches.setenv("HF_DATASETS_OFFLINE", "1")


def pytest_unconfigure(config: pytest.Config) -> None:
    _caches.undo()
    if CACHES in config.stash:
        shutil.rmtree(config.stash[CACHES], ignore_errors=True)


@pytest.fixture(scope="session")
def plain_run_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """make_plain_run's best/ (a run trained on plain text) served, for the serving and web page tests that only ask
    it (a server start is seconds): its base URL."""
    root = tmp_path_factory.mktemp("plain-run")
    with run_server(make_plain_run(root), root / "serve.log") as base:
        yield base


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, as in a terminal: a suite run in the background (CI's may be) inherits SIGINT
    ignored, and Python then installs no handler for it."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)

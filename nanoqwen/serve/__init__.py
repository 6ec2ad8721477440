"""OpenAI-compatible serving: `create_app` builds the FastAPI app, `nanoqwen serve` runs it with uvicorn."""

import os

# OpenMP's worker threads spin between parallel regions by default. In the server the engine's Python work
# and the HTTP event loop run between those regions and lose their cores to the spinning (3-4x slower
# decoding measured on a 2-core machine). The policy is read when torch loads OpenMP, so it is set here,
# before anything imports torch; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from nanoqwen.serve.app import create_app  # noqa: E402

__all__ = ["create_app"]

"""nanoqwen: train Qwen3-architecture language models from scratch."""

__version__ = "0.1.0"

from nanoqwen.errors import NanoQwenError  # noqa: E402

__all__ = ["NanoQwenError", "__version__"]

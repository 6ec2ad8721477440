"""Qwen3, the whole model in one file.

Module names equal Hugging Face's (`model.layers.3.self_attn.q_proj`, ...), so `state_dict()` keys are
the checkpoint keys. Shapes in comments: B batch, T new tokens, S keys (cached + new), H query heads,
K kv heads, D head_dim, C hidden size, V vocabulary size.

Reading it to learn, the path QWEN3.md describes: `Qwen3.forward` -> `DecoderLayer` -> `Attention` (RMSNorm,
QK-norm, `apply_rope`, `sdpa_attention`) and `MLP` (SwiGLU). What `prepare_for_decoding` sets (`DecodingParts`,
`DecodeNorm`, fused and column-major weights, `decode_attention`) only makes generation faster: the same
numbers, and training never touches it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoqwen.config import ModelConfig, rope_type


class DecodingParts:
    """A module with inference-only attributes that Qwen3.prepare_for_decoding sets (views of its weights, named in
    `decoding`). copy.deepcopy and pickle leave them out (None), and the copy's Qwen3 makes them again from its own
    weights (see Qwen3.__setstate__): a copied view would be a tensor of its own, no longer the copy's weights (an
    update in place would miss it), and would hold their memory a second time."""

    decoding: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **dict.fromkeys(self.decoding)}


class RMSNorm(DecodingParts, nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension: LayerNorm without the mean or a bias."""

    decoding = ("decode",)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.decode: DecodeNorm | None = None  # set by Qwen3.prepare_for_decoding (float32 only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode is not None and not torch.is_grad_enabled():
            return self.decode(x)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # same math, one call (fused on CUDA)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalize in fp32, cast back, *then* scale: the order Qwen3 (and Transformers) use.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecodeNorm:
    """RMSNorm in float32 for inference, in the fewest tensor ops: a decode step runs dozens of norms on
    vectors so small that each op's fixed cost is the whole cost (F.rms_norm is eight ops on CPU, this is four).
    x * rsqrt(mean(x^2) + eps) * w == x * (w * sqrt(n)) / hypot(||x||, sqrt(n * eps)), with both constants made
    once (hypot(a, b) is sqrt(a^2 + b^2), so the divisor is sqrt(sum(x^2) + n * eps)). `weight` may hold one row
    per head, (heads, n)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        n = weight.shape[-1]
        self.weight = weight.detach().float() * n ** 0.5
        self.root_eps = torch.tensor((n * eps) ** 0.5, device=weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).div_(torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.root_eps))


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies 1 / theta^(2i / D), i < D/2, in fp32, as config.rope_scaling stretches them
    (computed as Transformers computes them). "linear" divides them all by its factor (positions p -> p / factor).
    "yarn" divides only the slow ones, whose wavelength fits fewer than beta_slow (1) times into the original
    context, keeps the fast ones that turn more than beta_fast (32) times there, and blends those between
    along a linear ramp over i."""
    D, theta = config.head_dim, config.rope_theta
    powers = theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D)  # theta^(2i / D), (D/2,)
    inv_freq = 1.0 / powers
    rope, kind = config.rope_scaling or {}, rope_type(config.rope_scaling)
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind != "yarn":
        return inv_freq
    original = rope.get("original_max_position_embeddings", config.max_position_embeddings)

    def index_turning(turns: float) -> float:  # the i whose wavelength 2 pi theta^(2i / D) fits `turns` times
        return D * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = index_turning(rope.get("beta_fast") or 32), index_turning(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:  # a one-step ramp, not a division by zero
        high += 0.001
    ramp = ((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)  # 1: slow
    kept = 1 - ramp  # the share of each frequency left as it was
    return 1.0 / (rope["factor"] * powers) * (1 - kept) + inv_freq * kept


def rope_attention_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by, so every q.k logit by its square: 1 but for YaRN, whose default is
    0.1 ln(factor) + 1 (sharper attention over the longer context), or as attention_factor, mscale and
    mscale_all_dim set it."""
    rope = config.rope_scaling or {}
    if rope_type(config.rope_scaling) != "yarn":
        return 1.0
    if rope.get("attention_factor") is not None:
        return rope["attention_factor"]
    factor = rope["factor"]

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if rope.get("mscale") and rope.get("mscale_all_dim"):
        return mscale(rope["mscale"]) / mscale(rope["mscale_all_dim"])
    return mscale(1.0)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for the half-split layout, angles in fp32, each times `scale` (rope_attention_factor).
    positions (B, T) -> (B, T, 1, D), which broadcasts over the heads of (B, T, heads, D) projections. The first
    half of sin is negated so that apply_rope can rotate with one roll (see there)."""
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # (B, T, 1, D)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:  # in fp32, before the cast, as Transformers scales them
        cos, sin = cos * scale, sin * scale
    sin[..., :freqs.shape[-1]].neg_()
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) == roll(x, D/2) * (-1, +1):
    three ops instead of seven in float32 (one addcmul). In 16 bits each product is rounded, then the sum, as
    Transformers rounds them: addcmul's single rounding put a sixth of bf16 values one unit apart."""
    rolled = x.roll(x.shape[-1] // 2, -1)
    if x.dtype == torch.float32:
        return torch.addcmul(x * cos, rolled, signed_sin)
    return x * cos + rolled * signed_sin


def fuse_linears(*linears: nn.Linear, column_major: bool = False) -> torch.Tensor:
    """One weight for several projections of the same input, for inference: the layers' weights become
    row slices of it (same storage, so nothing is copied twice and in-place updates stay shared). Weights fused
    so already (a model prepared again, after share_memory() or a .to() that changed nothing) stay where they are."""
    fused = fused_already(linears, column_major)
    if fused is not None:
        return fused
    fused = torch.cat([linear.weight.detach() for linear in linears])
    if column_major:
        fused = to_column_major(fused)
    for linear, part in zip(linears, fused.split([lin.out_features for lin in linears])):
        linear.weight.data = part
    return fused


def fused_already(linears: tuple[nn.Linear, ...], column_major: bool) -> torch.Tensor | None:
    """The weight fuse_linears would make of `linears`, where their weights are its row slices already (None: they
    are not)."""
    first = linears[0].weight.detach()
    rows, columns = sum(linear.out_features for linear in linears), first.shape[1]
    stride = (1, rows) if column_major else (columns, 1)
    last = first.storage_offset() + (rows - 1) * stride[0] + (columns - 1) * stride[1]  # its last element's place
    if first.untyped_storage().nbytes() < (last + 1) * first.element_size():  # (as_strided would refuse it)
        return None
    fused = first.as_strided((rows, columns), stride)
    parts = fused.split([linear.out_features for linear in linears])
    if all(linear.weight.dtype == part.dtype and linear.weight.data_ptr() == part.data_ptr()
           and linear.weight.shape == part.shape and linear.weight.stride() == part.stride()
           for linear, part in zip(linears, parts)):
        return fused
    return None


def to_column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix stored transposed in memory: MKL streams it faster for a few input rows."""
    return weight.t().contiguous().t()


def decoding_layout(weight: torch.Tensor, column_major: bool) -> torch.Tensor:
    """`weight` stored as decoding reads it fastest: column-major (float32 on CPU), else row-major (a float32 model
    prepared, then converted to bf16, keeps the column-major layout, slower there). No copy where it is so already."""
    return to_column_major(weight) if column_major else weight.contiguous()


class KVCache:
    """Preallocated keys and values for every layer, written at the positions being decoded.

    All rows advance together (prompts are left-padded); `key_valid` marks which slots hold real
    tokens and `next_position` is each row's next RoPE position (padding takes none).
    """

    FIRST_WINDOW = 256  # slots a fixed-shape step attends at first; doubled as the cache fills

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        # Heads before slots: a layer's (B, K, S, D) is the layout attention reads, so a step transposes only the
        # rows it writes, never the whole cache.
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled so far, the same for every row
        self.padded = False  # some slot holds padding, so every step needs an explicit mask
        self.max_len = max_len
        self.slot: torch.Tensor | None = None  # (1,) the next slot, kept on the device once shapes are fixed
        self.window = 0  # slots the current fixed-shape step attends
        # cos and signed sin (rope_cos_sin) of every position a row can reach here (set by Qwen3.new_cache),
        # (max_len, 1, D) each: looked up at each forward instead of computed (a dozen small ops a step)
        self.cos: torch.Tensor | None = None
        self.signed_sin: torch.Tensor | None = None
        # One view per layer of the slots this forward writes, (B, T, K, D), and of all the slots it attends,
        # (B, K, S, D): made once per forward by `begin`, not by slicing in each layer's update
        self.new_keys: tuple[torch.Tensor, ...] = ()
        self.new_values: tuple[torch.Tensor, ...] = ()
        self.seen_keys: tuple[torch.Tensor, ...] = ()
        self.seen_values: tuple[torch.Tensor, ...] = ()

    def fix_shapes(self) -> None:
        """From here on, each step takes one token per row, writes it at a slot held on the device and
        attends the first `attention_window()` slots under the `key_valid` mask. Steps within one window
        have the same shapes and read nothing back to the host, so one CUDA graph replays them all
        (see generate.DecodeStep)."""
        self.slot = torch.full((1,), self.length, dtype=torch.long, device=self.keys.device)

    def attention_window(self) -> int:
        """Slots the next fixed-shape step attends: the filled ones and the one it writes, rounded up to
        FIRST_WINDOW times a power of two (at most max_len). A window serves many steps, and past the first it
        never attends more than twice the slots in use, however large the cache was made."""
        window = self.FIRST_WINDOW
        while window <= self.length:
            window *= 2
        return min(window, self.max_len)

    def begin(self, new_tokens: int) -> None:
        """Take the views `update` writes and reads for a forward of `new_tokens` tokens per row, every layer's at
        once: a layer's update is then a copy, where slicing the cache in each layer cost more ops than the copy."""
        start, end = self.length, self.length + new_tokens
        self.new_keys = self.keys[:, :, :, start:end].transpose(2, 3).unbind(0)  # (B, T, K, D) each
        self.new_values = self.values[:, :, :, start:end].transpose(2, 3).unbind(0)
        self.seen_keys = self.keys[:, :, :, :end].unbind(0)  # (B, K, S, D) each
        self.seen_values = self.values[:, :, :, :end].unbind(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, T, K, D) keys/values; return all of them so far, (B, K, S, D) (with fixed
        shapes: the window's, S = window). Without fixed shapes, `begin` comes first."""
        if self.slot is not None:
            self.keys[layer].index_copy_(2, self.slot, k.transpose(1, 2))
            self.values[layer].index_copy_(2, self.slot, v.transpose(1, 2))
            return self.keys[layer, :, :, :self.window], self.values[layer, :, :, :self.window]
        self.new_keys[layer].copy_(k)
        self.new_values[layer].copy_(v)
        return self.seen_keys[layer], self.seen_values[layer]


class Linear(nn.Linear):
    """A bias-free nn.Linear whose weight, on the meta device (shapes only: a checkpoint's tensors are assigned
    next), is left undrawn: torch 2.9's kaiming_uniform_ there imports sympy and torch's symbolic shapes (hundreds
    of modules, seconds at every load). Elsewhere it draws as nn.Linear does (the same seeded weights)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Attention(DecodingParts, nn.Module):
    """Causal grouped-query attention with QK-norm: H query heads share K kv heads (H / K each); q and k are
    RMS-normed per head, then rotated by RoPE."""

    decoding = ("qkv_weight_t", "o_weight_t", "qk_norm")

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        c = config.hidden_size
        self.q_proj = Linear(c, self.n_heads * self.head_dim)
        self.k_proj = Linear(c, self.n_kv_heads * self.head_dim)
        self.v_proj = Linear(c, self.n_kv_heads * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, c)
        self.dropout = config.attention_dropout  # on the attention weights, in training only
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)  # over each head's D (one weight for all heads)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # Set by Qwen3.prepare_for_decoding: q/k/v's weights fused into one, and o_proj's, each as a transposed
        # (in, out) view that mm and addmm take as it is (F.linear transposes its weight at every call)
        self.qkv_weight_t: torch.Tensor | None = None
        self.o_weight_t: torch.Tensor | None = None
        self.qk_norm: DecodeNorm | None = None  # both norms over a (B, T, H + K, D) block, set there too

    def forward(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, residual: torch.Tensor) -> torch.Tensor:
        """residual + attention(x). x is (B, T, C), or (B * T, C) token rows at inference."""
        B, T = cos.shape[:2]  # (not from x, which may be flattened to token rows)
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        inference = self.qkv_weight_t is not None and not torch.is_grad_enabled()
        # The fused weight's output columns are q's, k's, then v's, each head's D together: one view splits them.
        if inference and self.qk_norm is not None:  # one matmul; q and k normed and rotated as one block
            qk, v = torch.mm(x, self.qkv_weight_t).view(B, T, H + 2 * K, D).split([H + K, K], dim=2)
            q, k = apply_rope(self.qk_norm(qk), cos, signed_sin).split([H, K], dim=2)
        else:
            if inference:  # one matmul instead of three
                q, k, v = torch.mm(x, self.qkv_weight_t).view(B, T, H + 2 * K, D).split([H, K, K], dim=2)
            else:
                q, k, v = (self.q_proj(x).view(B, T, H, D), self.k_proj(x).view(B, T, K, D),
                           self.v_proj(x).view(B, T, K, D))
            # QK-norm over each head's D, then RoPE: q (B, T, H, D), k (B, T, K, D)
            q, k = apply_rope(self.q_norm(q), cos, signed_sin), apply_rope(self.k_norm(k), cos, signed_sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, T, D)
        if T == 1 and x.device.type == "cpu":
            y = decode_attention(q, k, v, mask)
        else:
            y = sdpa_attention(q.transpose(1, 2), k, v, mask, self.dropout if self.training else 0.0).transpose(1, 2)
        # y is (B, T, H, D), or (B, H * D) from decode_attention: heads joined back into x's layout
        return add_projection(residual, y.reshape(*x.shape[:-1], H * D), self.o_proj,
                              self.o_weight_t if inference else None)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   dropout: float) -> torch.Tensor:
    """SDPA of (B, H, T, D) queries over (B, K, S, D) keys/values -> (B, H, T, D), causal unless a mask is given
    (one query row, T = 1, sees every key)."""
    T, H, K = q.shape[2], q.shape[1], k.shape[1]
    gqa = H != K
    if gqa and not sdpa_takes_gqa(q.device, sdpa_dtype(q), mask is not None, T):
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        gqa = False
    # With enable_gqa, SDPA maps query head h to kv head h // (H / K) without copying K/V.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          is_causal=mask is None and T > 1, enable_gqa=gqa)


def sdpa_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype SDPA computes in: autocast's where it is on (SDPA is on its half-precision list)."""
    device = q.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype


def sdpa_takes_gqa(device: torch.device, dtype: torch.dtype, masked: bool, tokens: int) -> bool:
    """Whether to hand SDPA grouped K/V (enable_gqa) rather than K/V expanded to every query head. On CUDA
    only the flash kernel takes GQA among the fused ones, and flash takes no float32, no mask, and no GPU older
    than sm80 (A100; a T4 or V100 has none): there SDPA would fall back to its math kernel, which keeps
    (B, H, T, S) attention weights (O(T^2) memory a layer), so the model expands K/V for the memory-efficient
    kernel instead. One-token steps attend one row, where the math kernel costs little and an expansion would
    copy the whole cache each token. CPU's kernels take GQA in every case."""
    if device.type != "cuda" or tokens == 1:
        return True
    if masked or dtype not in (torch.float16, torch.bfloat16):
        return False
    return torch.cuda.get_device_properties(device).major >= 8  # a constant to torch.compile (folded, guarded)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new query per row, as two batched matmuls: on CPU, SDPA's kernel costs several
    times the arithmetic at this size. q (B, 1, H, D), k/v (B, K, S, D), mask (B, 1, 1, S) -> (B, H * D)."""
    B, _, H, D = q.shape
    K, S = k.shape[1], k.shape[2]
    q = q.reshape(B * K, H // K, D)  # the query heads that share each kv head, side by side
    scores = torch.bmm(q, k.flatten(0, 1).transpose(1, 2)).mul_(D ** -0.5)  # (B * K, H/K, S)
    if mask is not None:
        scores.view(B, K, H // K, S).masked_fill_(~mask, float("-inf"))
    return torch.bmm(scores.softmax(-1), v.flatten(0, 1)).view(B, H * D)  # CPU's softmax sums in fp32


class MLP(DecodingParts, nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    decoding = ("gate_up_weight_t", "down_weight_t")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        # Set by Qwen3.prepare_for_decoding: gate/up's weights fused into one, and down_proj's, as (in, out) views
        self.gate_up_weight_t: torch.Tensor | None = None
        self.down_weight_t: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + mlp(x)."""
        inference = self.gate_up_weight_t is not None and not torch.is_grad_enabled()
        if inference:  # one matmul instead of two
            gate, up = torch.mm(x, self.gate_up_weight_t).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return add_projection(residual, F.silu(gate) * up, self.down_proj, self.down_weight_t if inference else None)


def add_projection(residual: torch.Tensor, x: torch.Tensor, linear: nn.Linear, weight_t: torch.Tensor | None
                   ) -> torch.Tensor:
    """residual + linear(x): at inference, on token rows, one addmm over the linear's weight as (in, out)
    (`weight_t`, a view kept by prepare_for_decoding), the add riding on the matmul (one op fewer, twice a layer,
    in a decode step made of small ops). Training (weight_t None) keeps the plain sum, whose dtype autocast
    leaves alone."""
    if weight_t is not None:
        return torch.addmm(residual, x, weight_t)
    return residual + linear(x)


class DecoderLayer(nn.Module):
    """A pre-norm block: h = x + attention(norm(x)), then h + mlp(norm(h)). The residual is handed to attention
    and the MLP, which add it in their output projection (add_projection)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, signed_sin, mask, cache, residual=x)
        return self.mlp(self.post_attention_layernorm(h), residual=h)


def on_meta_device() -> bool:
    """Whether modules are being built on the meta device (`with torch.device("meta")`): shapes, no values."""
    return torch.get_default_device().type == "meta"


class Qwen3Model(nn.Module):
    """Embeddings, blocks and the final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # On the meta device (shapes only: a checkpoint's tensors are assigned next) nothing is drawn: there normal_'s
        # first call imports torch's Python meta kernels (sympy and hundreds of modules, seconds at every load).
        empty = torch.empty(config.vocab_size, config.hidden_size) if on_meta_device() else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=empty)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3(nn.Module):
    """Qwen3ForCausalLM: ids in, next-token logits (or final hidden states) out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.model = Qwen3Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        shapes_only = on_meta_device()  # (see Qwen3Model): RoPE's buffer too is made where the weights are assigned
        inv_freq = torch.empty(config.head_dim // 2) if shapes_only else rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # made from config: no checkpoint key
        self.rope_scale = rope_attention_factor(config)  # what cos and sin are multiplied by (YaRN's 1 + 0.1 ln s)
        self.activation_checkpointing = False
        self.prepared_for_decoding = False
        if not shapes_only:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialization lives here: normal(0, initializer_range) for matrices, ones for norms.

        Matrices are drawn in float32 whatever their dtype, then rounded: a seed gives a bf16 model (`nanoqwen init
        --dtype bf16`) the float32 weights cast, as normal_ into bf16 itself does not (on CPU, where numel is not a
        multiple of 16, the last 16 values come out otherwise). One matrix's float32 copy at a time: peak memory
        stays low."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                weight = module.weight
                drawn = weight if weight.dtype == torch.float32 else torch.empty_like(weight, dtype=torch.float32)
                nn.init.normal_(drawn, mean=0.0, std=std)
                if drawn is not weight:
                    weight.copy_(drawn)
                del drawn
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.inv_freq.copy_(rope_inv_freq(self.config, self.inv_freq.device))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def prepare_for_decoding(self) -> Qwen3:
        """Make inference faster without changing any weight's value or shape.

        Decoding is a chain of small memory-bound matrix-vector products, where each call's overhead
        counts: q/k/v and gate/up become one matmul each (their weights turn into slices of one fused
        tensor, so nothing is stored twice), and the layers keep transposed views of the weights they multiply
        by, which mm and addmm take with no op to transpose them. In float32 on CPU every projection weight,
        lm_head's too, is also kept column-major in memory, which MKL streams 1.3-2x faster against a few rows
        (bf16/fp16 get slower that way, so they are left alone). Logits agree to float32 rounding;
        save_checkpoint writes contiguous tensors either way. The views share the weights' storage, so weights
        updated in place stay in use, and `.to()`, `.half()` or `.cuda()` prepare the model again (see _apply);
        the float32 norms keep prescaled copies of their weights (DecodeNorm), so call this again after changing
        any norm weight or assigning a weight a new tensor.
        """
        self.forget_decoding()  # a model prepared before in another dtype keeps no float32-only parts
        weight = self.lm_head.weight
        float32_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_weight_t = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj, column_major=float32_cpu).t()
            mlp.gate_up_weight_t = fuse_linears(mlp.gate_proj, mlp.up_proj, column_major=float32_cpu).t()
            for linear in (attn.o_proj, mlp.down_proj):
                linear.weight.data = decoding_layout(linear.weight.data, float32_cpu)
            attn.o_weight_t, mlp.down_weight_t = attn.o_proj.weight.detach().t(), mlp.down_proj.weight.detach().t()
        weight.data = decoding_layout(weight.data, float32_cpu)
        if weight.dtype == torch.float32:
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.decode = DecodeNorm(module.weight, module.eps)
                elif isinstance(module, Attention):
                    module.qk_norm = DecodeNorm(torch.cat((module.q_norm.weight.expand(module.n_heads, -1),
                                                           module.k_norm.weight.expand(module.n_kv_heads, -1))),
                                                module.q_norm.eps)
        self.prepared_for_decoding = True
        return self

    def forget_decoding(self) -> None:
        """Drop what prepare_for_decoding keeps (views of the weights, prescaled norm weights): forward then
        runs the plain layers, as before it was called. The fused weights stay fused (same values)."""
        for module in self.modules():
            for name in getattr(module, "decoding", ()):
                setattr(module, name, None)
        self.prepared_for_decoding = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy or an unpickled model, its modules whole but without their decoding parts (DecodingParts): a
        prepared one is prepared again, from its own weights."""
        super().__setstate__(state)
        if state.get("prepared_for_decoding"):
            self.prepare_for_decoding()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Qwen3:
        """nn.Module's conversion (.to(), .half(), .cuda() ...), with a prepared model prepared again: the
        decode path's views would still hold the old tensors (another device or dtype, and kept in memory). RoPE's
        frequencies stay at least float32, as a model loaded in 16 bits has them: rounded to bf16 they would put
        each angle off by up to 2^-9 of itself (radians, far into the context)."""
        prepared = self.prepared_for_decoding
        self.forget_decoding()
        super()._apply(fn, recurse)
        if self.inv_freq.dtype.itemsize < 4:  # as loaded in 16 bits (Transformers' from_pretrained too)
            self.inv_freq = rope_inv_freq(self.config, self.inv_freq.device)
        return self.prepare_for_decoding() if prepared else self

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        weight = self.model.embed_tokens.weight
        cache = KVCache(self.config, batch_size, max_len, weight.device, weight.dtype)
        # A row's position never passes its slot (padding takes none), so max_len positions cover every row.
        every_position = torch.arange(max_len, device=weight.device)[:, None]  # (max_len, 1), as (B, T)
        # (max_len, 1, 1, D) each
        cos, signed_sin = rope_cos_sin(every_position, self.inv_freq, weight.dtype, self.rope_scale)
        cache.cos, cache.signed_sin = cos[:, 0], signed_sin[:, 0]
        return cache

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or (B, logits_to_keep, V) when it is > 0.

        attention_mask (B, T), 1 for real tokens and 0 for left padding, is needed only for padded
        batches. With `cache`, the T tokens are appended to it. `return_hidden` returns the final
        normed hidden states (B, T, C) instead of logits, for losses that project in chunks.
        """
        B, T = input_ids.shape
        device = input_ids.device
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} were asked for")
        if cache is not None and cache.slot is not None:
            if T != 1 or attention_mask is not None or return_hidden:
                raise ValueError("a fixed-shape cache takes one token per row, with no attention_mask, "
                                 "and gives logits")
            return self._fixed_shape_step(input_ids, cache)
        if attention_mask is None:
            steps = torch.arange(T, device=device)
            positions = steps.expand(B, T) if cache is None else cache.next_position[:, None] + steps
            real, new_positions = None, T
        else:
            real = attention_mask.to(device=device, dtype=torch.bool)
            first = cache.next_position[:, None] if cache is not None else 0
            positions = (first + real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T); padding repeats a position
            new_positions = real.long().sum(-1)
        mask = None  # None means plain causal (or a single new token that sees everything)
        if cache is not None:
            cache.key_valid[:, start:start + T] = True if real is None else real
            cache.next_position += new_positions
            cache.padded |= real is not None
            cache.begin(T)
        padded = attention_mask is not None or (cache is not None and cache.padded)
        # SDPA's is_causal lines its mask up top-left (query i sees keys 0..i): several new tokens after cached ones
        # need their own mask, which lines them up with the last keys.
        if padded or (cache is not None and start > 0 and T > 1):
            key_valid = cache.key_valid[:, :start + T] if cache is not None else real
            query_slot = torch.arange(start, start + T, device=device)
            key_slot = torch.arange(start + T, device=device)
            allowed = (key_slot[None, :] <= query_slot[:, None])[None] & key_valid[:, None, :]  # (B, T, S)
            # a padding row still sees itself: a row that sees no key would softmax to nan
            allowed |= key_slot[None, None, :] == query_slot[None, :, None]
            mask = allowed[:, None]  # (B, 1, T, S)
        x = self.blocks(input_ids, positions, mask, cache)
        if cache is not None:
            cache.length = start + T
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def blocks(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
               cache: KVCache | None) -> torch.Tensor:
        """Embeddings and every decoder layer: (B, T) ids at (B, T) RoPE positions -> (B, T, C)."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if cache is not None and cache.cos is not None and cache.signed_sin is not None:
            cos, signed_sin = cache.cos[positions], cache.signed_sin[positions]  # (B, T, 1, D), made once per cache
        else:
            cos, signed_sin = rope_cos_sin(positions, self.inv_freq, x.dtype, self.rope_scale)
        if self.prepared_for_decoding and not torch.is_grad_enabled():
            x = x.view(B * T, -1)  # token rows: no reshaping around each matmul of a decode step
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, signed_sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, signed_sin, mask, cache)
        return x.view(B, T, -1)

    def _fixed_shape_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """forward() of one token per row over a cache with fixed shapes (KVCache.fix_shapes): all the
        bookkeeping happens in device tensors, so a CUDA graph of this step stays right on replay."""
        positions = cache.next_position[:, None].clone()
        cache.key_valid.index_fill_(1, cache.slot, True)
        cache.next_position += 1
        cache.window = cache.attention_window()  # a host value, but the same for every step a graph replays
        # Slots after this one are not valid yet, so the validity mask is the causal mask too.
        x = self.blocks(input_ids, positions, cache.key_valid[:, None, None, :cache.window], cache)
        cache.slot += 1
        cache.length += 1
        return self.lm_head(self.model.norm(x))

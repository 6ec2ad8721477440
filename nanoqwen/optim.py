"""Optimizers and learning-rate schedules.

- AdamW: weight decay on the 2-D matrices of the blocks (never on norms or biases; on the embeddings
  only with `decay_embeddings`).
- Muon: `torch.optim.Muon` on the 2-D hidden matrices (attention and MLP projections), AdamW on the
  embeddings, the head and the norms. Muon uses Moonshot's `match_rms_adamw` step size, so one `--lr`
  suits both halves.
- Schedules are plain functions of the step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nanoqwen.distributed import native_bf16
from nanoqwen.errors import NanoQwenError

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
ADAM_BETAS = (0.9, 0.95)


# -- learning-rate schedules ----------------------------------------------------------------------
def lr_at(step: int, *, max_lr: float, min_lr: float, warmup: int, total: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`.

    cosine: linear warmup to max_lr, then a half cosine down to min_lr at the last step.
    wsd (warmup-stable-decay): linear warmup, flat at max_lr, then linear to min_lr over the last
    `decay_fraction` of the steps after the warmup (at least one).
    """
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if schedule == "cosine":
        # A warmup that ends on the step before the last leaves no span to decay over: the last step is at min_lr.
        span = total - 1 - warmup
        progress = (step - warmup) / span if span > 0 else 1.0
        return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_start = wsd_decay_start(total, warmup, decay_fraction)
        if step < decay_start:
            return max_lr
        return max_lr + (min_lr - max_lr) * min(1.0, (step - decay_start + 1) / (total - decay_start))
    raise NanoQwenError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def wsd_decay_start(total: int, warmup: int, decay_fraction: float = 0.2) -> int:
    """First step of WSD's decay. Before it the rate does not depend on `total`, which may still change."""
    return total - max(1, round(decay_fraction * (total - warmup)))


def set_lr(optimizer: torch.optim.Optimizer | HybridOptimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# -- parameter groups -----------------------------------------------------------------------------
def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """`hidden`: 2-D matrices inside the blocks; `embedding`: embedding and head; `other`: norms, biases.

    Tied weights appear once (named_parameters drops duplicates).
    """
    groups: dict[str, list[nn.Parameter]] = {"hidden": [], "embedding": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "embed_tokens" in name or "lm_head" in name:
            groups["embedding"].append(p)
        elif p.ndim == 2:
            groups["hidden"].append(p)
        else:
            groups["other"].append(p)
    return groups


class MuonFp32(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iteration in fp32 instead of bf16.

    Same state ("momentum_buffer"), hyperparameters and update; for CPUs, where a bf16 matmul can be
    a hundred times slower than an fp32 one, and GPUs that only emulate bf16 (T4, V100).
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            a, b, c = group["ns_coefficients"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                x = update.float()
                if x.shape[0] > x.shape[1]:  # wide: x @ x.T below is then the smaller Gram matrix
                    x = x.T
                x = x / x.norm().clamp(min=group["eps"])  # spectral norm <= 1
                for _ in range(group["ns_steps"]):  # x = U S V^T -> a x + b (x x^T) x + c (x x^T)^2 x: S towards 1
                    gram = x @ x.T
                    x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                if update.shape[0] > update.shape[1]:
                    x = x.T
                adjusted = torch.optim._muon._adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(x.to(p.dtype), alpha=-adjusted)
        return loss


class HybridOptimizer:
    """Several optimizers stepped as one: shared `param_groups`, one state_dict (duck-types Optimizer)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # Read through every time: load_state_dict gives each optimizer new group dicts, so a list kept
        # from before would miss every later learning-rate change.
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict.get("optimizers", [])
        if len(parts) != len(self.optimizers):
            raise ValueError(f"expected the state of {len(self.optimizers)} optimizers, got {len(parts)}")
        for optimizer, part in zip(self.optimizers, parts):
            optimizer.load_state_dict(part)


Optimizer = torch.optim.Optimizer | HybridOptimizer


def fused_adamw(device: torch.device, loss_scaled: bool) -> bool:
    """Whether AdamW steps every tensor in one fused kernel: on CPU 7x faster than foreach (3.7M params); on MPS,
    which has no foreach kernels, instead of several kernels for each tensor in turn. Not on MPS where fp16's
    GradScaler scales the loss: MPS's fused kernel ignored the scaler's found_inf until pytorch#186360 (mid-2026),
    stepping on the inf gradients the scaler means to skip."""
    return device.type in ("cuda", "cpu") or (device.type == "mps" and not loss_scaled)


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, device: torch.device,
                    decay_embeddings: bool = False, loss_scaled: bool = False) -> Optimizer:
    """AdamW (fused: see fused_adamw) or the Muon + AdamW hybrid, with decay only where it belongs. `loss_scaled`:
    the gradients come through fp16's GradScaler."""
    if name not in OPTIMIZERS:
        raise NanoQwenError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    parts = split_parameters(model)
    embedding_decay = weight_decay if decay_embeddings else 0.0
    adam_kwargs: dict[str, Any] = {"lr": lr, "betas": ADAM_BETAS, "eps": 1e-8}
    if fused_adamw(device, loss_scaled):
        adam_kwargs["fused"] = True
    groups = [{"params": parts["embedding"], "weight_decay": embedding_decay},
              {"params": parts["other"], "weight_decay": 0.0}]
    if name == "adamw":
        groups.insert(0, {"params": parts["hidden"], "weight_decay": weight_decay})
        return torch.optim.AdamW([g for g in groups if g["params"]], **adam_kwargs)
    # torch's Muon runs Newton-Schulz in bf16: right where the hardware has it, slow where it is emulated
    muon_class = torch.optim.Muon if native_bf16(device) else MuonFp32
    muon = muon_class(parts["hidden"], lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    adam = torch.optim.AdamW([g for g in groups if g["params"]], **adam_kwargs)
    return HybridOptimizer([muon, adam])

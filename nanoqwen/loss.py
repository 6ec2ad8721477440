"""Next-token cross-entropy that never materializes the full (tokens, vocab) logits.

With the Qwen3 vocabulary (151,936 ids) the logits of one 8 x 2048 batch are 10 GB in fp32, more than
the model. `chunked_cross_entropy` projects the final hidden states through the head a chunk of tokens
at a time and, when gradients are needed, computes the gradients of that chunk right away (as Liger's
fused linear cross-entropy does): one matmul for the logits and two for the gradients, no recompute,
and only one chunk of logits alive at a time. backward() then only scales the stored gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoqwen.model import Qwen3

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MiB in fp32)
MIN_CHUNK_ROWS = 256  # fewer rows make the (V, C) weight-gradient update memory-bound


def chunk_rows(vocab_size: int, budget: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk of logits holds about `budget` numbers."""
    return max(MIN_CHUNK_ROWS, budget // vocab_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk: int) -> torch.Tensor:
        # hidden (N, C), weight (V, C), targets (N,). Matmuls in the autocast (else the activations') dtype,
        # softmax and the loss in fp32, the weight gradient accumulated in fp32.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(dtype)
                t, ok = targets[start:start + chunk], valid[start:start + chunk]
                logits = (h @ w.T).float()  # (n, V): the only chunk of logits alive
                safe_t = t.clamp(min=0)
                target_logits = logits.gather(1, safe_t[:, None]).squeeze(1)
                if not needs_grad:
                    total += ((torch.logsumexp(logits, dim=-1) - target_logits) * ok).sum()
                    continue
                # The softmax built in place in `logits`, its exponentials computed once for both the loss
                # and the gradient: five passes over the chunk instead of eight.
                peak = logits.amax(dim=-1, keepdim=True)
                exps = logits.sub_(peak).exp_()
                sums = exps.sum(dim=-1)
                total += ((peak.squeeze(1) + sums.log() - target_logits) * ok).sum()
                # d(sum of losses)/d logits = softmax - onehot, 0 on ignored rows
                grad_logits = exps.mul_((ok / sums)[:, None])
                grad_logits[torch.arange(len(t), device=t.device), safe_t] -= ok.float()
                grad_logits = grad_logits.to(dtype)
                grad_hidden[start:start + chunk] = grad_logits @ w
                if dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, h)
                else:  # low-precision chunk products, summed in fp32
                    grad_weight.add_(grad_logits.T @ h)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        gh = (grad_hidden * scale.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX = skip).

    hidden (..., C), weight (V, C), targets (...). Equal, values and gradients, to
    `F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten())`.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk or chunk_rows(weight.shape[0]))


def plain_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: full logits, then cross-entropy in fp32."""
    logits = (hidden @ weight.to(hidden.dtype).T).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


class CausalLMLoss(nn.Module):
    """The training objective as one module, so DDP and FSDP see the head used by the loss.

    forward(inputs, targets) -> mean next-token loss; `model` is the Qwen3 being trained.
    """

    def __init__(self, model: Qwen3) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = chunked_cross_entropy

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """torch.compile the model; the loss (a Python loop over chunks) stays eager."""
        self.loss_fn = torch.compiler.disable(chunked_cross_entropy)
        super().compile(*args, **kwargs)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs, return_hidden=True)  # (B, T, C)
        return self.loss_fn(hidden, self.model.lm_head.weight, targets)

"""Next-token cross-entropy that never materializes the full (tokens, vocab) logits.

With the Qwen3 vocabulary (151,936 ids) the logits of one 8 x 2048 batch are 10 GB in fp32, more than
the model. `chunked_cross_entropy` projects the final hidden states through the head a chunk of tokens
at a time and, when gradients are needed, computes the gradients of that chunk right away (as Liger's
fused linear cross-entropy does): one matmul for the logits and two for the gradients, no recompute,
and only one chunk of logits alive at a time. backward() then only scales the stored gradients. Under
`train --compile` each chunk's softmax and gradient is one compiled reduction and one fused pass.

fp16 (GradScaler's path, GPUs without bf16) is the exception: its logits' gradient must be multiplied by the
loss scale before its cast to fp16, as autograd does Transformers' fp32 loss, so backward() computes it, with
the logits again (four matmuls, not three).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoqwen.model import Qwen3

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MiB in fp32)
# On a GPU every chunk also reads and writes the whole (V, C) fp32 weight gradient once (0.62 GB at qwen3-0.6b,
# 1.2 GB of traffic): fewer, larger chunks (1,766 tokens at the Qwen3 vocabulary, 512 MiB of bf16 logits).
CUDA_CHUNK_ELEMENTS = 1 << 28
MIN_CHUNK_ROWS = 256  # fewer rows make the (V, C) weight-gradient update memory-bound


def chunk_rows(vocab_size: int, device_type: str = "cpu") -> int:
    """Tokens per chunk so that one chunk of logits holds about CHUNK_ELEMENTS numbers (on CUDA, more)."""
    budget = CUDA_CHUNK_ELEMENTS if device_type == "cuda" else CHUNK_ELEMENTS
    return max(MIN_CHUNK_ROWS, budget // vocab_size)


def loss_and_logit_grads(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One chunk's summed loss (fp32); `logits` (n, V) are overwritten with its gradient d(sum of losses) /
    d(logits) = softmax - onehot (0 on rows not `valid`), in their own dtype.

    The softmax is built in place, its exponentials computed once for both the loss and the gradient: five
    passes over the chunk instead of eight (bf16 logits take two more, to float32 and back).
    """
    grads = logits.float()  # the same tensor when it already is float32
    safe_targets = targets.clamp(min=0)
    target_logits = grads.gather(1, safe_targets[:, None]).squeeze(1)
    peak = grads.amax(dim=-1, keepdim=True)
    sums = grads.sub_(peak).exp_().sum(dim=-1)
    loss = ((peak.squeeze(1) + sums.log() - target_logits) * valid).sum()
    grads.mul_((valid / sums)[:, None])
    grads[torch.arange(len(targets), device=targets.device), safe_targets] -= valid.float()
    if grads is not logits:
        logits.copy_(grads)
    return loss


def softmax_statistics(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's summed loss (fp32), and each row's largest logit (n, 1) and sum of exp(logit - largest) (n,)
    for `write_logit_grads`. Reads the logits only: compiled, one reduction over the chunk."""
    x = logits.float()
    target_logits = x.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    peak = x.amax(dim=-1, keepdim=True)
    sums = (x - peak).exp().sum(dim=-1)
    return ((peak.squeeze(1) + sums.log() - target_logits) * valid).sum(), peak, sums


def write_logit_grads(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, peak: torch.Tensor,
                      sums: torch.Tensor) -> None:
    """Overwrite `logits` with d(sum of losses) / d(logits) = softmax - onehot (0 on rows not `valid`), in their
    own dtype: compiled, one pass that reads each logit and writes its gradient (bf16 stays bf16)."""
    x = logits.float()
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets.clamp(min=0)[:, None]
    logits.copy_((x - peak).exp() * (valid / sums)[:, None] - onehot * valid[:, None].float())


def fusable_loss_and_logit_grads(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                                 statistics: Callable[..., tuple[torch.Tensor, ...]] = softmax_statistics,
                                 write: Callable[..., None] = write_logit_grads) -> torch.Tensor:
    """`loss_and_logit_grads` written for torch.compile, which fuses each half (`statistics`, `write`) into one
    kernel over the chunk. In-place steps and the indexed write of the one-hot would each cut the fusion (about
    4x slower, measured on CPU); eager, this form is the slow one.

    Two compiled halves, not one function: compiled whole, torch 2.11's inductor (the GPU machine's; 2.13's does
    not) ran the target logit's gather after the kernel that overwrote the logits, so the loss read a gradient
    there and came out about 1 nat too high (the gradients were right). A half that only reads the logits, then
    one whose every read is the write's own element, leave no order to get wrong."""
    loss, peak, sums = statistics(logits, targets, valid)
    write(logits, targets, valid, peak, sums)
    return loss


SoftmaxStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@cache
def compiled_softmax_step() -> SoftmaxStep:
    """`fusable_loss_and_logit_grads` with its halves under torch.compile, made once (shapes are static: a run
    compiles each for its chunk and its last, shorter one)."""
    return partial(fusable_loss_and_logit_grads, statistics=torch.compile(softmax_statistics, dynamic=False),
                   write=torch.compile(write_logit_grads, dynamic=False))


def head_pass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
              chunk: int, dtype: torch.dtype, softmax_step: SoftmaxStep
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The head and the cross-entropy, a chunk of tokens at a time: the summed loss (fp32) and, given `weights`
    (N,: each token's factor, bool or fp32), the gradients of the weighted sum of losses: d/d(hidden) in hidden's
    dtype, d/d(weight) in fp32. Matmuls in `dtype`, the softmax in fp32; no weights, no gradient (evaluation)."""
    device = hidden.device.type
    valid = targets != IGNORE_INDEX
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if weights is not None else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weights is not None else None
    with torch.autocast(device, enabled=False):
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(dtype)
            t = targets[start:start + chunk]
            logits = h @ w.T  # (n, V): the only chunk of logits alive
            if weights is None:
                logits = logits.float()
                target_logits = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
                total += ((torch.logsumexp(logits, dim=-1) - target_logits) * valid[start:start + chunk]).sum()
                continue
            total += softmax_step(logits, t, weights[start:start + chunk])
            grad_logits = logits  # overwritten with the gradient
            grad_hidden[start:start + chunk] = grad_logits @ w
            if dtype == torch.float32:
                grad_weight.addmm_(grad_logits.T, h)
            else:  # low-precision chunk products, summed in fp32
                grad_weight.add_(grad_logits.T @ h)
    return total, grad_hidden, grad_weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk: int, softmax_step: SoftmaxStep) -> torch.Tensor:
        # hidden (N, C), weight (V, C), targets (N,). Matmuls in the autocast (else the activations') dtype,
        # softmax and the loss in fp32, the weight gradient accumulated in fp32.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)  # no target at all: a loss of 0, not 0/0
        # fp16: the gradients wait for backward() and its grad_output (the loss scale): cast to fp16 unscaled, a
        # probability under fp16's 6e-8 was 0, and the head rows of the tokens a peaked model rules out got no
        # gradient. Scaled first, an overflow is inf, which GradScaler answers by skipping and a lower scale.
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.deferred = needs_grad and dtype == torch.float16
        total, grad_hidden, grad_weight = head_pass(hidden, weight, targets,
                                                    valid if needs_grad and not ctx.deferred else None, chunk,
                                                    dtype, softmax_step)
        if ctx.deferred:
            ctx.save_for_backward(hidden, weight, targets, count)
            ctx.chunk, ctx.dtype, ctx.softmax_step = chunk, dtype, softmax_step
        else:
            ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        if ctx.deferred:
            hidden, weight, targets, count = ctx.saved_tensors
            scaled = (targets != IGNORE_INDEX) * (grad_output / count)  # each token's d(output) / d(its loss)
            _, grad_hidden, grad_weight = head_pass(hidden, weight, targets, scaled, ctx.chunk, ctx.dtype,
                                                    ctx.softmax_step)
            return (grad_hidden if ctx.needs_input_grad[0] else None,
                    grad_weight.to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None, None, None, None)
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        gh = (grad_hidden * scale.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int | None = None, compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX = skip).

    hidden (..., C), weight (V, C), targets (...). Equal, values and gradients, to
    `F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten())` (but 0, not its nan, where
    every target is IGNORE_INDEX). `chunk`: tokens per chunk (None: `chunk_rows`). `compiled`: each chunk's
    softmax and gradient run as compiled kernels (the matmuls are the same either way).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if not torch.is_grad_enabled():
        # A Function's needs_input_grad follows requires_grad, not the grad mode: under no_grad the head (a
        # parameter) still asked for the gradient matmuls and a (V, C) fp32 buffer that nothing would read.
        hidden, weight = hidden.detach(), weight.detach()
    step = compiled_softmax_step() if compiled else loss_and_logit_grads
    chunk = chunk or chunk_rows(weight.shape[0], hidden.device.type)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, step)


def plain_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: full logits, then cross-entropy in fp32."""
    logits = (hidden @ weight.to(hidden.dtype).T).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


class CausalLMLoss(nn.Module):
    """The training objective as one module, so DDP and FSDP see the head used by the loss.

    forward(inputs, targets) -> mean next-token loss; `model` is the Qwen3 being trained. inputs and targets are
    (B, T), targets already shifted (targets[:, t] is the token after inputs[:, t]: the loader cuts both from one
    window of T + 1 tokens), IGNORE_INDEX where a token is not scored.
    """

    def __init__(self, model: Qwen3) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = chunked_cross_entropy

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """torch.compile the model; the loss's loop over chunks stays eager and compiles each chunk's
        softmax and gradient on its own."""
        self.loss_fn = torch.compiler.disable(partial(chunked_cross_entropy, compiled=True))
        super().compile(*args, **kwargs)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs, return_hidden=True)  # (B, T, C)
        return self.loss_fn(hidden, self.model.lm_head.weight, targets)

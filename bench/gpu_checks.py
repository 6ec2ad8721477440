"""The checks of `bash bench/gpu_run.sh check1` and `check2` that are more than one command, each failing
with a reason.

    python bench/gpu_checks.py loss-falls RUN     # bf16 autocast and torch.compile were used; the loss fell
    python bench/gpu_checks.py resume DATA W [TRAIN ARGS]  # stopped by SIGTERM and resumed: follows the full run
    python bench/gpu_checks.py logits CKPT        # logits equal Transformers' on the GPU (fp32)
    python bench/gpu_checks.py serve CKPT         # `nanoqwen serve` batches four greedy requests: eager text
    python bench/gpu_checks.py flash              # training attention runs on SDPA's flash kernel (GQA, bf16)
    python bench/gpu_checks.py cuda-graph CKPT    # decoding through the CUDA graph: same tokens, tokens/s
    python bench/gpu_checks.py loss               # chunked loss, eager and compiled, equals the plain one; timed

$DEVICE (default cuda) names the device, so that the checks themselves can be tried on a CPU; $STEPS (default
100) the length of the resume check's runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEVICE = os.environ.get("DEVICE", "cuda")
STEPS = int(os.environ.get("STEPS", "100"))


def losses(run: Path) -> dict[int, float]:
    """step -> train loss, from whole lines only (the run may be writing the next one)."""
    path = run / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return {r["step"]: r["train_loss"] for r in (json.loads(line) for line in lines if line.endswith("}"))}


def loss_falls(run: str) -> None:
    config = json.loads((Path(run) / "config.json").read_text(encoding="utf-8"))
    curve = list(losses(Path(run)).values())
    print("dtype", config["dtype"], "compile", config["train"]["compile"], "loss", curve[0], "->", curve[-1])
    if DEVICE == "cuda":
        assert config["dtype"] == "torch.bfloat16" and config["train"]["compile"], "not the bf16 + compile path"
    assert curve[-1] < curve[0] - 2, "the loss did not fall by 2 nats"


def resume(data: str, work: str, *extra: str) -> None:
    """The same STEPS-step run twice: once straight through, once stopped by SIGTERM after 40% of it and resumed.
    GPU kernels are not bit-exact from run to run (atomics in backward), so the steps after the stop are
    compared within a tolerance; the CPU tests assert exact equality."""
    args = [sys.executable, "-m", "nanoqwen", "train", "--preset", "tiny", "--data", data, "--device", DEVICE,
            "--max-steps", str(STEPS), "--eval-interval", "1000", "--sample-interval", "0", "--save-interval", "1000",
            *extra]
    full, stopped = Path(work) / "full", Path(work) / "stopped"
    subprocess.run([*args, "--out", str(full)], check=True, cwd=ROOT)
    proc = subprocess.Popen([*args, "--out", str(stopped)], cwd=ROOT)
    while proc.poll() is None and len(losses(stopped)) < STEPS * 2 // 5:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 128 + signal.SIGTERM, "SIGTERM did not end the run cleanly (saved, status 143)"
    stop = max(losses(stopped))
    assert stop < STEPS, "the run ended before the signal arrived"
    subprocess.run([sys.executable, "-m", "nanoqwen", "train", "--resume", str(stopped)], check=True, cwd=ROOT)
    a, b = losses(full), losses(stopped)
    assert sorted(b) == list(range(1, STEPS + 1)), f"resumed metrics do not cover steps 1-{STEPS} once each"
    gap = max(abs(a[s] - b[s]) for s in range(stop + 1, STEPS + 1))
    print(f"stopped after step {stop}; largest train-loss gap after it: {gap:.2e}")
    assert gap < 2e-2, gap


def logits(checkpoint: str) -> None:
    import transformers

    from nanoqwen.checkpoint import load_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(0, 1000, (2, 64), device=DEVICE)
    ours, _ = load_checkpoint(checkpoint, torch.device(DEVICE), torch.float32)
    # Loaded in Transformers' default dtype, then cast: before 4.56 its models refuse `dtype=` (named torch_dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    theirs = theirs.to(DEVICE, torch.float32).eval()
    with torch.no_grad():
        gap = (ours.eval()(ids) - theirs(ids).logits).abs().max().item()
    print(f"largest logit gap, fp32 on {DEVICE}: {gap:.2e}")
    assert gap < 1e-3, gap


def serve(checkpoint: str) -> None:
    """`nanoqwen serve` on the device (fp32) answers four greedy completions sent together, one batch that
    its engine decodes through a CUDA graph after four steps, with the text of eager `generate` here."""
    import asyncio

    import httpx

    from nanoqwen.checkpoint import load_checkpoint
    from nanoqwen.generate import SamplingParams, generate
    from tests.serve_helpers import run_server

    prompts = ["ROMEO:", "JULIET:", "What light through yonder", "To be, or not"]
    model, tokenizer = load_checkpoint(checkpoint, torch.device(DEVICE), torch.float32)
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=tokenizer.stop_ids)
    expected = [generate(model.prepare_for_decoding(), tokenizer, [p], params)[0].text for p in prompts]

    async def ask_together(url: str) -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as client:
            replies = await asyncio.gather(*(client.post(f"{url}/v1/completions", json={
                "prompt": p, "max_tokens": 24, "temperature": 0, "stop": []}) for p in prompts))
        return [r.json() for r in replies]

    with tempfile.TemporaryDirectory() as tmp, run_server(Path(checkpoint), Path(tmp) / "serve.log",
                                                            "--device", DEVICE, "--dtype", "float32") as url:
        replies = asyncio.run(ask_together(url))
    for reply, text in zip(replies, expected):
        print(reply["choices"][0]["text"][:60].replace("\n", " | "), reply["usage"])
        assert reply["choices"][0]["text"] == text, (reply, text)


def flash() -> None:
    """Forward and backward of qwen3-0.6b-shaped layers (16 query heads over 8 kv heads, head_dim 128) with
    only SDPA's flash backend allowed: an error here means training falls back to a slower kernel."""
    import dataclasses

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nanoqwen.config import load_preset
    from nanoqwen.model import Qwen3

    config = dataclasses.replace(load_preset("qwen3-0.6b").model, num_hidden_layers=2, vocab_size=1024)
    model = Qwen3(config).to(DEVICE)
    ids = torch.randint(0, 1024, (2, 512), device=DEVICE)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast(DEVICE, dtype=torch.bfloat16):
        model(ids).float().logsumexp(-1).mean().backward()
    print("flash attention ran forward and backward for", config.num_attention_heads, "query heads over",
          config.num_key_value_heads, "kv heads, head_dim", config.head_dim)
    one_token_attention(config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    gqa_fallbacks(config.num_attention_heads, config.num_key_value_heads, config.head_dim)


def gqa_fallbacks(heads: int, kv_heads: int, head_dim: int) -> None:
    """The model's attention where flash cannot run it (float32 training, `--dtype float32`; a mask, as padded
    prefill has) runs forward and backward with SDPA's math kernel ruled out: that kernel keeps the (B, H, T, T)
    attention weights, O(T^2) memory a layer. The model expands K/V there (model.sdpa_takes_gqa) so the
    memory-efficient kernel takes it; an error here means it did not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nanoqwen.model import sdpa_attention

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for dtype in (torch.bfloat16, torch.float32):
        for masked in (False, True):
            q = torch.randn(2, heads, 256, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(2, kv_heads, 256, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
                    for _ in "kv")
            mask = torch.ones(256, 256, dtype=torch.bool, device=DEVICE).tril() if masked else None
            with sdpa_kernel(fused):
                sdpa_attention(q, k, v, mask, 0.0).sum().backward()
            print(f"GQA attention, {str(dtype)[6:]}, {'masked' if masked else 'causal'}: a fused kernel, "
                  "forward and backward")


def one_token_attention(heads: int, kv_heads: int, head_dim: int) -> None:
    """A decode step's attention (one query per row, bf16, a masked window of cached keys) through SDPA,
    as the model does on CUDA, and through decode_attention's two bmm calls, which the model uses on CPU:
    SDPA's flash kernel takes no mask, so on CUDA the call may fall back to a kernel that copies K/V per
    query head. Timed, for the choice; not asserted."""
    from nanoqwen.model import decode_attention

    repeats = 50 if DEVICE == "cuda" else 2  # (a CPU only tries the check)
    for batch, window in ((1, 1024), (16, 1024), (1, 8192)):
        q = torch.randn(batch, 1, heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
        k, v = (torch.randn(batch, kv_heads, window, head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in "kv")
        mask = torch.ones(batch, 1, 1, window, dtype=torch.bool, device=DEVICE)
        mask[:, :, :, window // 2:] = False  # half the window not filled yet
        calls = {"sdpa": partial(sdpa_one_token, q, k, v, mask), "bmm": partial(decode_attention, q, k, v, mask)}
        sdpa, bmm = (calls[name]().reshape(batch, -1).float() for name in ("sdpa", "bmm"))
        times = {}
        for name, call in calls.items():
            for _ in range(3):
                call()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(repeats):
                call()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            times[name] = (time.perf_counter() - started) / repeats * 1e6
        print(f"one-token attention, batch {batch}, window {window}: SDPA {times['sdpa']:.0f} us, "
              f"bmm {times['bmm']:.0f} us; largest gap {(sdpa - bmm).abs().max().item():.1e}")


def cuda_graph(checkpoint: str) -> None:
    """The decode step replayed from CUDA graphs gives the usual eager step's logits (fp32, a left-padded
    batch of two, 63 steps fed the same tokens, attention windows from 16 slots, so captured four times),
    and greedy generation gives the same tokens; prints the single-stream tokens/s of each. A capture that
    fails only warns in nanoqwen; here it fails the check."""
    import warnings

    from nanoqwen.checkpoint import load_checkpoint
    from nanoqwen.generate import DecodeStep, SamplingParams, generate_ids
    from nanoqwen.model import KVCache

    warnings.filterwarnings("error", message="decoding without a CUDA graph")
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tokenizer = load_checkpoint(checkpoint, torch.device(DEVICE), torch.float32)
    model.prepare_for_decoding()
    pair = [tokenizer.encode("ROMEO:"), tokenizer.encode("What light through yonder window breaks? It is")]
    width = max(map(len, pair))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in pair], device=DEVICE)
    real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in pair], device=DEVICE)
    gap, first_window = 0.0, KVCache.FIRST_WINDOW
    KVCache.FIRST_WINDOW = 16
    with torch.inference_mode():
        caches = [model.new_cache(2, width + 64) for _ in range(2)]
        token = [model(ids, cache=c, attention_mask=real, logits_to_keep=1) for c in caches][0][:, -1].argmax(-1)
        step = DecodeStep(model, caches[1])
        for _ in range(63):
            usual, replayed = model(token[:, None], cache=caches[0]), step(token)
            gap = max(gap, (usual - replayed).abs().max().item())
            token = usual[:, -1].argmax(-1)
    KVCache.FIRST_WINDOW = first_window
    print(f"largest logit gap, graph against eager, fp32 on {DEVICE}: {gap:.2e}; captured: {step.replay is not None}")
    assert gap < 1e-3 and (step.replay is not None or DEVICE != "cuda"), gap
    params = SamplingParams(max_new_tokens=64, temperature=0)
    usual, graph = (list(generate_ids(model, pair, params, fixed_shapes=fixed)) for fixed in (False, True))
    assert graph == usual, "greedy generation through the graph chose other tokens"
    params.max_new_tokens = 256 if DEVICE == "cuda" else 16  # (a CPU only tries the check)
    for run, fixed in enumerate((False, True, False, True)):  # the first two warm up
        started = time.perf_counter()
        steps = sum(1 for _ in generate_ids(model, pair[:1], params, fixed_shapes=fixed))
        seconds = time.perf_counter() - started
        print(f"{'warm-up' if run < 2 else 'timed'}: single stream, {steps} tokens, {steps / seconds:.0f} tok/s "
              f"{'with fixed shapes (a CUDA graph on CUDA)' if fixed else 'eager'}")


def loss() -> None:
    """The training loss at qwen3-0.6b's head (C 1024, the Qwen3 vocabulary, 8,192 tokens, bf16 autocast):
    chunked eager and chunked compiled (`train --compile`) against full logits, values and gradients; then
    the time of a forward and backward of each, and the peak memory it adds."""
    from nanoqwen.loss import chunked_cross_entropy, plain_cross_entropy

    torch.manual_seed(0)
    tokens, repeats = (8192, 5) if DEVICE == "cuda" else (512, 1)  # (a CPU only tries the check)
    hidden = torch.randn(tokens, 1024, device=DEVICE, requires_grad=True)
    weight = (0.02 * torch.randn(151936, 1024, device=DEVICE)).requires_grad_()
    targets = torch.randint(0, 151936, (tokens,), device=DEVICE)
    targets[:100] = -100
    ways = {"plain": plain_cross_entropy, "chunked": chunked_cross_entropy,
            "chunked-compiled": partial(chunked_cross_entropy, compiled=True)}

    def run(way: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden.grad = weight.grad = None
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            value = ways[way](hidden, weight, targets)
        value.backward()
        return value.detach(), hidden.grad, weight.grad

    reference = run("plain")
    for way in ways:
        for _ in range(2):  # the first compiles
            got = run(way)
        for name, a, b in zip(("loss", "hidden grad", "weight grad"), got, reference):
            scale = b.abs().max().item()
            gap = (a.float() - b.float()).abs().max().item()
            assert gap <= 1e-3 * max(1.0, scale) + 2e-2 * scale, (way, name, gap, scale)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        for _ in range(repeats):
            run(way)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - before) / 2**30 if DEVICE == "cuda" else float("nan")
        print(f"loss {way}: {(time.perf_counter() - started) / repeats * 1e3:.1f} ms forward + backward, "
              f"{extra:.2f} GiB above the inputs at peak; loss {got[0].item():.4f}")


def sdpa_one_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's CUDA call for one query per row: q (B, 1, H, D), k/v (B, K, S, D) -> (B, 1, H, D)."""
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                                            enable_gqa=True).transpose(1, 2)


if __name__ == "__main__":
    checks = {"loss-falls": loss_falls, "resume": resume, "logits": logits, "serve": serve, "flash": flash,
              "cuda-graph": cuda_graph, "loss": loss}
    checks[sys.argv[1]](*sys.argv[2:])

"""Code paths that run only on a CUDA GPU, checked on CPU by making torch claim what a GPU would say."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from nanoqwen.config import ModelConfig
from nanoqwen.distributed import resolve_device, resolve_dtype
from nanoqwen.errors import NanoQwenError
from nanoqwen.model import Qwen3
from nanoqwen.optim import MuonFp32, build_optimizer

CUDA = torch.device("cuda")


def claim_gpu(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    """A GPU with bf16 tensor cores (Ampere and later), or one that only emulates bf16 (T4, V100), for which
    torch.cuda.is_bf16_supported() still says True unless asked without emulation."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def test_a_device_that_is_not_there_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):  # the device as given, not its type
        with pytest.raises(NanoQwenError, match=f"^--device {name} was asked for but no CUDA GPU is visible"):
            resolve_device(name)
    with pytest.raises(NanoQwenError, match="--device mps was asked for but Apple MPS is not available"):
        resolve_device("mps")
    with pytest.raises(NanoQwenError, match="unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu")
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")


def test_auto_picks_cuda_then_mps_and_cuda_n_keeps_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for cuda, auto in ((True, torch.device("cuda")), (False, torch.device("mps"))):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert resolve_device("auto") == auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # --device cuda:1: that GPU, not the current one


@pytest.mark.parametrize("native", [True, False], ids=["ampere", "t4-v100"])
def test_default_dtype_is_fp16_where_bf16_is_only_emulated(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    # Emulated bf16 made the default on a T4 or V100, so the fp16 + GradScaler path never ran there.
    claim_gpu(monkeypatch, native)
    assert resolve_dtype(None, CUDA) == (torch.bfloat16 if native else torch.float16)
    assert resolve_dtype("bfloat16", CUDA) == torch.bfloat16  # asked for: emulation still runs it
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    for names, dtype in [(("float32", "fp32"), torch.float32), (("bfloat16", "bf16"), torch.bfloat16),
                         (("float16", "fp16"), torch.float16)]:  # --dtype's short names are the long ones'
        assert [resolve_dtype(name, torch.device("cpu")) for name in names] == [dtype, dtype]


@pytest.mark.parametrize("native", [True, False], ids=["ampere", "t4-v100"])
def test_muon_newton_schulz_in_fp32_where_bf16_is_only_emulated(monkeypatch: pytest.MonkeyPatch,
                                                                native: bool) -> None:
    claim_gpu(monkeypatch, native)
    model = Qwen3(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    muon = build_optimizer(model, "muon", 1e-3, 0.1, CUDA).optimizers[0]  # type: ignore[union-attr]
    assert isinstance(muon, torch.optim.Muon) and isinstance(muon, MuonFp32) != native


def test_the_default_preset_is_demo_in_bf16_compiled_on_cuda_and_cpu_in_float32_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # DESIGN.md's default: `nanoqwen train` on a (CUDA) GPU trains demo, on a laptop (CPU or Apple MPS) the cpu preset.
    from nanoqwen.runs import default_preset_name
    from nanoqwen.train import default_compile

    claim_gpu(monkeypatch, native_bf16=True)
    assert (default_preset_name(CUDA), resolve_dtype(None, CUDA), default_compile(CUDA)) == ("demo", torch.bfloat16,
                                                                                              True)
    for device in (torch.device("mps"), torch.device("cpu")):
        assert (default_preset_name(device), resolve_dtype(None, device), default_compile(device)) == (
            "cpu", torch.float32, False)


def test_a_cpu_run_on_a_machine_with_a_bf16_gpu_keeps_muons_fp32_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU's bf16 is no CPU's: `--device cpu` beside an Ampere GPU still runs Newton-Schulz in fp32.
    from nanoqwen.distributed import native_bf16

    claim_gpu(monkeypatch, native_bf16=True)
    assert native_bf16(CUDA) and not native_bf16(torch.device("cpu"))

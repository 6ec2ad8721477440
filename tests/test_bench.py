"""The benchmark scripts still run (at toy sizes, on the CPU): a GPU is lent rarely and briefly, and a bench
that broke since its last run would waste it. Nothing here is timed: speed lives in bench/README.md."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str):  # noqa: ANN201 (a module loaded from a path)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_bench_gives_both_contenders_the_same_weights_and_data() -> None:
    bench = bench_module("train")
    results = {contender: bench.run_worker(contender, "cpu", 2, 32, 2, 1, "cpu", False, {"num_hidden_layers": 1})
               for contender in ("nanoqwen", "transformers")}
    ours, theirs = results["nanoqwen"], results["transformers"]
    assert ours["params"] == theirs["params"] and len(ours["losses"]) == len(theirs["losses"]) == 3
    assert abs(ours["losses"][0] - theirs["losses"][0]) < 1e-4  # same weights, same first batch
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 for r in results.values())


def test_the_generation_bench_prints_its_table() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "generate.py"), "--new-tokens", "4", "--repeats", "1",
                           "--runs", "1", "--no-server", "--toy"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| tiny-")]
    assert [re.sub(r" \(.*?\)", "", row.split(" | ")[0]) + " | " + row.split(" | ")[1] for row in rows] == [
        "| tiny-qwen3-vocab | single-stream decode (tok/s)", "| tiny-qwen3-vocab | time to first token (ms)",
        "| tiny-qwen3-vocab | single-stream sampled decode, top-p 0.95 T=1, final norm x20 (tok/s)",
        "| tiny-8k-vocab | single-stream decode (tok/s)", "| tiny-8k-vocab | time to first token (ms)",
        "| tiny-8k-vocab | single-stream sampled decode, top-p 0.95 T=1, final norm x20 (tok/s)"]
    assert "vocab 8192" in rows[3] and "vocab 151936" in rows[0]
    for row in rows:  # nanoqwen's figure, Transformers', and their ratio, all measured
        ours, theirs, ratio = (float(cell.strip("x ").split()[0]) for cell in row.strip("| ").split(" | ")[2:5])
        assert ours > 0 and theirs > 0 and ratio > 0


def test_the_prepare_bench_corpus_stops_at_the_size_asked_for(tmp_path: Path) -> None:
    # --mb below one copy of Shakespeare (5.1 MB) wrote the whole copy: `--mb 0.3` timed 5.1 MB.
    nbytes = bench_module("prepare").make_corpus(tmp_path, 0.3)
    sizes = [len(p.read_bytes()) for p in sorted(tmp_path.iterdir())]
    assert sum(sizes) == nbytes and sum(sizes[:-1]) < 0.3e6 <= nbytes  # the works up to the one that reaches it


def test_the_target_run_stopped_at_its_target_is_a_result_not_a_failure(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The bench stops the demo run with SIGTERM once an evaluation reaches the target, and `nanoqwen train` exits
    # 143 after that stop: read as "the demo run failed", the `target` stage of a GPU lease failed on success.
    bench = bench_module("train")

    class DemoRun:  # `nanoqwen train` whose first evaluation reaches the target, stopped as the real one is
        def __init__(self, command: list[str], **_: object) -> None:
            out = Path(command[command.index("--out") + 1])
            out.mkdir(parents=True)
            record = {"step": 50, "train_loss": 3.95, "val_loss": 3.9, "tokens": 819200, "elapsed_s": 41.6}
            (out / "metrics.jsonl").write_text(json.dumps(record) + "\n")
            self.returncode: int | None = None

        def poll(self) -> int | None:
            return self.returncode

        def send_signal(self, number: int) -> None:
            self.returncode = 128 + number

        def wait(self) -> int | None:
            return self.returncode

    monkeypatch.setattr(bench.subprocess, "Popen", DemoRun)
    monkeypatch.setattr(bench.time, "sleep", lambda seconds: None)
    # elapsed_s is the run's training loop; the process's start (imports, data, model) counts in a wall clock too
    assert re.fullmatch(r"\| demo to val loss 4\.0 \| 42 s of training \(<= \d+ s from launch\), step 50, "
                        r"819,200 tokens \|", bench.time_to_target(4.0, 6))
    DemoRun.send_signal = lambda self, number: setattr(self, "returncode", 1)  # a run that crashed instead
    with pytest.raises(SystemExit, match="the demo run failed with exit code 1"):
        bench.time_to_target(4.0, 6)


def test_each_prepare_row_builds_its_tokenizer_inside_its_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bench asked whether tiktoken was installed by building the cached Qwen3 encoding before the default row's
    # clock started: that row timed prepare without the build a `nanoqwen prepare` run pays (the seed's row loads
    # its tokenizer inside its time).
    bench = bench_module("prepare")
    caches = bench.prepare_module._qwen3_tiktoken, bench.prepare_module._qwen3_fingerprint
    warm_at_start: list[list[int]] = []

    def prepare(corpus: str, spec: str, out: Path, **_: object) -> Path:
        warm_at_start.append([cache.cache_info().currsize for cache in caches])
        caches[0]()  # what the real prepare builds (the fingerprint: where a folder is checked)
        return out

    monkeypatch.setattr(bench, "prepare", prepare)
    monkeypatch.setattr(bench, "load_meta", lambda out: {"splits": {"train": {"tokens": 1}}})
    rows, _ = bench.time_nanoqwen(tmp_path, tmp_path, tmp_path / "out")
    assert len(rows) == 3 and warm_at_start == [[0, 0]] * 3


def test_the_seed_prepare_row_times_no_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # seed_prepare imports datasets and transformers (seconds) inside its clock, where nanoqwen's modules were
    # imported before any: the seed's row was slower by its imports.
    bench = bench_module("prepare")
    monkeypatch.delitem(sys.modules, "datasets", raising=False)  # put back after the test
    imported_at_start: list[bool] = []

    def seed_prepare(*_: object) -> int:
        imported_at_start.append({"datasets", "transformers.models.auto.tokenization_auto"} <= set(sys.modules))
        return 1

    monkeypatch.setattr(bench, "seed_prepare", seed_prepare)
    assert bench.time_seed(tmp_path, tmp_path, tmp_path, 2)[1] == 1 and imported_at_start == [True]


def test_a_training_row_compiled_on_one_side_only_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # On CUDA nanoqwen trains compiled (as `nanoqwen train` does there) and Transformers eager: the published row
    # read as the same setup on both sides.
    import nanoqwen.train

    bench = bench_module("train")
    compiled: dict[str, bool] = {}

    def run_worker(contender: str, *args: object, **_: object) -> dict:
        compiled[contender] = args[-1]
        return {"tokens_per_s": 1.0, "peak_bytes": 1, "losses": [1.0]}

    monkeypatch.setattr(bench, "run_worker", run_worker)
    monkeypatch.setattr(nanoqwen.train, "default_compile", lambda device: True)  # as on CUDA
    row = bench.compare("qwen3-0.6b, 4 x 2048", "qwen3-0.6b", 4, 2048, 1, 1, "cpu")[0]
    assert compiled == {"nanoqwen": True, "transformers": False}
    assert row.startswith("| qwen3-0.6b, 4 x 2048 (nanoqwen compiled, Transformers eager) |")
    row = bench.compare("the same, both under torch.compile", "cpu", 4, 64, 1, 1, "cpu", both_compiled=True)[0]
    assert compiled == {"nanoqwen": True, "transformers": True} and "eager" not in row


def test_the_generation_bench_reports_a_cuda_graph_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # On CUDA nanoqwen decodes through a CUDA graph (as `nanoqwen sample` does) and Transformers' generate eagerly:
    # the table's header must say so, so the worker reports which path its model took.
    bench = bench_module("generate")
    model = bench.random_checkpoint(tmp_path / "toy", "qwen3", toy=True)
    for graph in (False, True):
        monkeypatch.setattr(bench, "graphs_by_default", lambda model, graph=graph: graph)  # True: as on CUDA
        bench.worker("nanoqwen", model, [1, 2, 3], 2, 1, "cpu", "float32")
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["graph"] is graph


def test_the_training_bench_names_transformers_attention() -> None:
    # A guard, not a regression: Transformers' default (sdpa here) is what a newer version or another machine may
    # change, and an eager baseline would make every ratio a kernel's, not the libraries'.
    from nanoqwen.config import load_preset

    bench = bench_module("train")
    config = dataclasses.replace(load_preset("cpu").model, num_hidden_layers=1, bos_token_id=2047,
                                 eos_token_id=2047, pad_token_id=2047)
    model = bench.build("transformers", config, torch.device("cpu"), False)[0]
    assert model.config._attn_implementation == bench.ATTENTION == "sdpa"


def test_the_mfu_row_counts_flops_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    # PaLM's count (6N + 12 L H d T) takes attention over all T x T scores, where a causal kernel does half: at
    # qwen3-0.6b's 2048 that is 28% of the count, so the row gives the MFU both ways.
    from nanoqwen.config import load_preset

    bench = bench_module("train")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    config = load_preset("qwen3-0.6b").model
    palm = 6 * config.num_params() + 12 * 28 * 16 * 128 * 2048  # tied embeddings: the head is the only lookup's
    tokens_per_s = 0.4 * 989e12 / palm
    causal = 0.4 * (palm - 6 * 28 * 16 * 128 * 2048) / palm
    assert bench.mfu_row("cuda", tokens_per_s).endswith(f"| MFU 40.0% (PaLM's count; {causal:.1%} counting causal "
                                                         "attention's half) |")


def test_a_failed_generation_worker_says_why(tmp_path: Path) -> None:
    # The workers' stderr was captured and dropped: a failure (on a GPU lease, once) printed only an exit status.
    bench = bench_module("generate")
    with pytest.raises(SystemExit, match=r"(?s)the nanoqwen worker failed:.*missing"):
        bench.single_stream(tmp_path / "missing", [1, 2], 2, 1, 1, "cpu", "float32")


def test_the_generation_bench_says_so_when_transformers_streams_late(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Transformers 5.25 defers its stop check on MPS, streaming each token one forward pass late (and plans it for
    # CUDA): the clock would time the first token after the second forward. Emulated here by deferring the puts.
    from transformers.generation import utils

    def put_late(self, unfinished_sequences: torch.Tensor, tokens: torch.Tensor, length: int) -> bool:
        if getattr(self, "held", None) is not None:
            self.streamer.put(self.held)
        self.held = tokens.cpu()
        return bool(unfinished_sequences.max() == 0)

    def finish(self) -> int:
        self.streamer.put(self.held)
        return 0

    bench = bench_module("generate")
    model = bench.random_checkpoint(tmp_path / "toy", "qwen3", toy=True)
    on_time = bench.transformers_timer(model, "cpu", "float32")
    assert not on_time.streams_late and len(on_time([1, 2, 3], 3, False)) == 3
    if not hasattr(utils, "StopCheck"):
        pytest.skip("this Transformers has no deferred stop check (StopCheck) to emulate")
    monkeypatch.setattr(utils.StopCheck, "__call__", put_late)
    monkeypatch.setattr(utils.StopCheck, "finish", finish)
    # measured all the same (a GPU lease gives one try), and flagged for the note under the table
    late = bench.transformers_timer(model, "cpu", "float32")
    assert late.streams_late and len(late([1, 2, 3], 3, False)) == 3


def test_the_generation_bench_gives_transformers_only_its_own_sampling(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # generate() took what its call left unset from the checkpoint's generation_config.json: a --model whose file
    # had a repetition_penalty (or no_repeat_ngram_size...) had Transformers do work nanoqwen's side did not.
    from transformers.generation import utils

    bench = bench_module("generate")
    model = bench.random_checkpoint(tmp_path / "toy", "qwen3", toy=True)
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, "repetition_penalty": 1.3}))
    processors: list[list[str]] = []
    original = utils.GenerationMixin._get_logits_processor

    def spy(self, *args: object, **kwargs: object):  # noqa: ANN202 (Transformers' own return type)
        chosen = original(self, *args, **kwargs)
        processors.append([type(p).__name__ for p in chosen])
        return chosen

    monkeypatch.setattr(utils.GenerationMixin, "_get_logits_processor", spy)
    timer = bench.transformers_timer(model, "cpu", "float32")
    processors.clear()
    timer([1, 2, 3], 2, False)
    timer([1, 2, 3], 2, True)
    assert processors == [[], ["TopPLogitsWarper"]]  # greedy: none; sampled: top-p 0.95 at T=1, no top-k


def test_the_training_bench_cuda_tables_assemble(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # main()'s CUDA branch runs only on a lent GPU: a slip in it (a name, a row's order) would cost the lease.
    # Its workers are faked here; what is checked is that every row the runbook reads is printed.
    bench = bench_module("train")
    workers: list[tuple[str, str, bool]] = []

    def run_worker(contender: str, preset: str, *args: object, **_: object) -> dict:
        workers.append((contender, preset, args[-1]))
        return {"tokens_per_s": 1000.0, "peak_bytes": 1 << 30, "losses": [12.0]}

    monkeypatch.setattr(bench, "run_worker", run_worker)
    monkeypatch.setattr(bench, "time_to_target", lambda target, minutes: f"| demo to val loss {target} | faked |")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(sys, "argv", ["train.py", "--device", "cuda", "--compiled"])
    bench.main()
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows == ["| MFU", "| qwen3-0.6b, 4 x 2048, NVIDIA H100 80GB HBM3", "| setup",
                    "| qwen3-0.6b, 4 x 2048 (nanoqwen compiled, Transformers eager)",
                    "| demo preset (Qwen3 vocab), 32 x 512 (nanoqwen compiled, Transformers eager)",
                    "| qwen3-0.6b, 4 x 2048, both under torch.compile", "| time to target", "| demo to val loss 4.0"]
    # the MFU comes from the speed row's nanoqwen run: no third qwen3-0.6b process; both compiled in the last row
    assert workers.count(("nanoqwen", "qwen3-0.6b", True)) == 2
    assert workers[-2:] == [("transformers", "qwen3-0.6b", True), ("nanoqwen", "qwen3-0.6b", True)]


def test_the_generation_bench_cuda_header_says_which_decodes_through_a_graph(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # main()'s CUDA path runs only on a lent GPU; its workers are faked here, reporting a graph as nanoqwen's does there
    bench = bench_module("generate")
    model = bench.random_checkpoint(tmp_path / "toy", "qwen3", toy=True)
    medians = {(library, mode): (0.01, 100.0) for library in ("nanoqwen", "transformers") for mode in bench.MODES}
    devices: list[tuple[str, str]] = []

    def single_stream(model_dir: Path, prompt_ids: list[int], new_tokens: int, repeats: int, runs: int, device: str,
                      dtype: str) -> tuple[dict, int, bool]:
        devices.append((device, dtype))
        return medians, 1000, True

    monkeypatch.setattr(bench, "single_stream", single_stream)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(sys, "argv", ["generate.py", "--device", "cuda", "--model", str(model), "--no-server"])
    bench.main()
    out = capsys.readouterr().out
    assert devices == [("cuda", "bfloat16")]  # both libraries in bfloat16 on CUDA
    assert "NVIDIA H100 80GB HBM3, bfloat16" in out
    assert "nanoqwen decodes through a CUDA graph, Transformers generate eagerly" in out
    assert len([line for line in out.splitlines() if line.startswith("| toy (")]) == 3


@pytest.mark.parametrize(("platform", "reported"), [("linux", 2048), ("darwin", 2048 * 1024)])
def test_the_training_bench_reads_peak_memory_in_the_platforms_unit(monkeypatch: pytest.MonkeyPatch, platform: str,
                                                                    reported: int) -> None:
    # getrusage's ru_maxrss is in KiB on Linux but in bytes on macOS, where the bench said 1024 times the memory
    bench = bench_module("train")
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(bench.resource, "getrusage", lambda who: type("Usage", (), {"ru_maxrss": reported}))
    assert bench.peak_rss() == 2 << 20


def test_the_training_bench_runs_where_there_is_no_getrusage(monkeypatch: pytest.MonkeyPatch) -> None:
    # `resource` is Unix-only: on Windows the bench failed at its import. It runs there, its rows without the CPU
    # peak memory.
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` fails, as on Windows
    bench = bench_module("train")
    assert bench.peak_rss() is None

    def run_worker(contender: str, *args: object, **_: object) -> dict:
        return {"tokens_per_s": 2.0 if contender == "nanoqwen" else 1.0, "peak_bytes": bench.peak_rss(),
                "losses": [1.0]}

    monkeypatch.setattr(bench, "run_worker", run_worker)
    row = bench.compare("cpu preset", "cpu", 4, 64, 1, 1, "cpu")[0]
    assert row == "| cpu preset | 1 | 2 | **2.00x** | n/a | n/a | n/a | 0.0e+00 |"

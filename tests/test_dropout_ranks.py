"""Under torchrun each rank draws dropout masks of its own (every rank was seeded alike and drew the same masks on
its different micro-batches), its weights still drawn alike; each rank's generators are saved and resumed, so a
job stopped and resumed on as many processes follows the curve of one that never stopped, bit for bit."""

from __future__ import annotations

import json
import signal
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from nanoqwen.checkpoint import restore_rank_rng, saved_rng, seed_dropout
from tests.train_helpers import (
    FAST,
    make_data,
    make_preset,
    run_train,
    signalled_at_step,
    train_command,
    train_losses,
)

CPU = torch.device("cpu")


def drawing_worker(rank: int, folder: str) -> None:
    """One of two processes of a gloo job: weights drawn from the run's seed, then what its dropout draws before and
    after a save of every rank's generators, and after that save was put back in a process seeded otherwise; to
    folder/RANK.json."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", 2), rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    torch.manual_seed(7)
    weights = torch.randn(4)
    seed_dropout(7, rank)
    masks = torch.rand(6)
    saved = saved_rng(CPU)  # a collective: every rank's generators, on rank 0
    after_save = torch.rand(6)
    if rank == 0:
        torch.save(saved, f"{folder}/rng.pt")
    else:
        assert saved is None
    dist.barrier()
    torch.manual_seed(123)  # a resumed process: seeded by its start, then the save put back
    seed_dropout(7, rank)
    restore_rank_rng(torch.load(f"{folder}/rng.pt", weights_only=True), CPU, rank)
    resumed = torch.rand(6)
    dist.destroy_process_group()
    Path(folder, f"{rank}.json").write_text(json.dumps({name: values.tolist() for name, values in (
        ("weights", weights), ("masks", masks), ("after_save", after_save), ("resumed", resumed))}))


def test_each_rank_draws_its_own_masks_from_weights_drawn_alike_and_resumes_them(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(drawing_worker, args=(str(tmp_path),), nprocs=2, start_method="fork")
    zero, one = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert zero["weights"] == one["weights"]  # FSDP2 shards the weights each rank built: they must agree
    assert zero["masks"] != one["masks"]
    # rank 0 draws what one process does (a one-process run's numbers are those of before)
    torch.manual_seed(7)
    torch.randn(4)
    assert zero["masks"] == torch.rand(6).tolist()
    assert zero["resumed"] == zero["after_save"] and one["resumed"] == one["after_save"]


def test_a_rank_the_save_holds_nothing_of_keeps_its_own_seeding() -> None:
    # A resume on more processes than saved, or a save from before each rank's generators were kept (rank 0's
    # alone, under "rng"): the others draw from their own seeds, not rank 0's masks again.
    torch.manual_seed(0)
    old_save = {"rng": {"torch": torch.get_rng_state()}}
    one_process = saved_rng(CPU)
    assert torch.equal(one_process["rng"]["torch"], torch.get_rng_state()) and one_process["other_ranks_rng"] == []
    torch.rand(3)
    seed_dropout(0, 1)
    own = torch.get_rng_state()
    restore_rank_rng(old_save, CPU, 1)
    assert torch.equal(torch.get_rng_state(), own)
    restore_rank_rng(old_save, CPU, 0)
    assert torch.equal(torch.get_rng_state(), old_save["rng"]["torch"])
    seed_dropout(0, 2)
    assert not torch.equal(torch.get_rng_state(), own)  # every rank a seed of its own


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("dropout-data"))


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_preset(tmp_path_factory.mktemp("dropout-preset"))


def stopped_at_step(command: list[str], step: int, stop: signal.Signals, err: Path) -> int:
    """The step last/ holds once the job `command` was stopped as it reported `step` (see signalled_at_step)."""
    signalled_at_step(command, step, stop, err)
    out = command[command.index("--out" if "--out" in command else "--resume") + 1]
    return json.loads(Path(out, "last/train_state.json").read_text())["step"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_torchrun_job_with_dropout_resumes_each_ranks_masks_on_the_uninterrupted_curve(
        data: Path, preset: Path, tmp_path: Path) -> None:
    # Two processes (gloo), dropout 0.3 on the attention weights: stopped by a SIGTERM (saved as it stops) and by a
    # SIGKILL between saves (resumed from the save before), resumed on two processes each time.
    args = ["--config", str(preset), "--data", str(data), *FAST, "--max-steps", "40", "--log-interval", "1",
            "--save-interval", "5", "--set", "attention_dropout=0.3"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    done = run_train(*args, "--out", str(reference), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    # each rank's generator is saved, and rank 1's is not rank 0's: it drew other masks
    saved = torch.load(reference / "last/train_state.pt", weights_only=True)
    assert len(saved["other_ranks_rng"]) == 1
    assert not torch.equal(saved["other_ranks_rng"][0]["torch"], saved["rng"]["torch"])
    killed_at = stopped_at_step(train_command(*args, "--out", str(stopped), nproc=2), 6, signal.SIGKILL,
                                tmp_path / "err1")
    assert 5 <= killed_at < 40
    resume = ["--resume", str(stopped), "--device", "cpu"]
    assert killed_at < stopped_at_step(train_command(*resume, nproc=2), killed_at + 1, signal.SIGTERM,
                                       tmp_path / "err2") < 40
    done = run_train(*resume, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = train_losses(reference), train_losses(stopped)
    assert list(got) == list(range(1, 41))
    assert got == expected  # bit for bit

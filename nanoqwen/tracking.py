"""What a run reports as it goes: the live progress display, MFU, and the trackers (TensorBoard, W&B).

The trackers, when asked for, mirror every metrics.jsonl record and every sample as it is written:
`nanoqwen train --tensorboard` into RUN/tensorboard (so `tensorboard --logdir runs` compares runs live),
`--wandb` into a Weights & Biases run named after the run folder, with its config.json as the W&B config.
metrics.jsonl stays the record of truth. Both packages are optional: asking for one that is missing is one
clear line before training starts.
"""

from __future__ import annotations

import html
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from shlex import quote
from types import ModuleType
from typing import Any

import torch

from nanoqwen.config import ModelConfig
from nanoqwen.distributed import on_rank0
from nanoqwen.errors import NanoQwenError, first_line
from nanoqwen.generate import printable
from nanoqwen.io import is_json_number

FOLDER = "tensorboard"
# Dense bf16 peak FLOP/s per GPU, for MFU, by device-name substring (torch.cuda.get_device_name()); the first
# match wins, so variants come before their family.
PEAK_BF16_FLOPS = {"H200 NVL": 835e12, "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12}


# -- progress and MFU ------------------------------------------------------------------------------
def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM's count): 6 per weight used in a matmul, plus attention.

    Every weight is a matmul weight except an untied embedding table (a lookup); a tied one is the head.
    """
    lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    matmul_params = config.num_params() - lookup
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_params + attention


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The GPU's dense peak for training in `dtype`, None where unknown. float32 runs its matmuls on the TF32
    tensor cores (train turns TF32 on): half the bf16 (and fp16) rate on every GPU listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return peak / 2 if peak is not None and dtype == torch.float32 else peak


class Display:
    """A live progress bar on a terminal; plain lines every `log_interval` steps otherwise."""

    def __init__(self, enabled: bool, first: int, total: int, log_interval: int) -> None:
        self.enabled, self.total, self.log_interval = enabled, total, log_interval
        self.progress = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.progress.add_task("train", total=total, completed=first, info="")
            self.progress.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step, total=self.total, info=info)
        elif step % self.log_interval == 0 or step in (1, self.total):
            print(f"step {step}/{self.total} | {info}", flush=True)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            print(text)
        else:  # as text: a sample's "[/INST]" was rich markup, whose MarkupError ended the run, and ":fire:" an
            # emoji; its control characters shown, as sample and chat show them on a terminal
            self.progress.console.print(printable(text), markup=False, highlight=False, emoji=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# -- trackers -------------------------------------------------------------------------------------
class Tracker:
    """A live mirror of the run's metrics.jsonl records and samples in another tool (rank 0 only)."""

    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (its `step` and numbers)."""
        raise NotImplementedError

    @staticmethod
    def charted(record: dict[str, Any]) -> dict[str, Any]:
        """The numbers of a record, what a tracker charts: a step that trained nothing (--loss-on assistant) has
        a train_loss of null, no point (neither 0, a perfect step, nor a failed log call), and a no_targets flag."""
        return {key: value for key, value in record.items() if is_json_number(value)}

    def sample(self, step: int, text: str) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)  # flushes: the last steps before an error are the ones worth seeing


def summary_writer_class() -> type:
    """torch's SummaryWriter, or one clear line when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise NanoQwenError("--tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or train without --tensorboard; metrics.jsonl and loss.png are written either way)"
                            ) from e
    return SummaryWriter


def scalar_tag(key: str) -> str:
    """A metrics.jsonl key as a TensorBoard tag, grouped into train/ and val/ sections:
    val_loss -> val/loss, train_loss -> train/loss, lr -> train/lr."""
    for section in ("train", "val"):
        if key.startswith(section + "_"):
            return f"{section}/{key.removeprefix(section + '_')}"
    return f"train/{key}"


class TensorBoardLog(Tracker):
    def __init__(self, run_dir: Path, last_saved_step: int) -> None:
        # A resumed run writes again every step after its last save; purge_step tells TensorBoard to drop
        # what the interrupted process had logged from there on, so each step shows once, as metrics.jsonl has it.
        # From step 1 for a new run: a run killed before its first save leaves its folder to one (and its events).
        self.writer = summary_writer_class()(log_dir=str(run_dir / FOLDER), flush_secs=30,
                                             purge_step=last_saved_step + 1)

    def record(self, record: dict[str, Any]) -> None:
        for key, value in self.charted(record).items():
            if key != "step":
                self.writer.add_scalar(scalar_tag(key), value, record["step"])

    def sample(self, step: int, text: str) -> None:
        # TensorBoard renders text as markdown: indented, the sample keeps its lines and spacing
        self.writer.add_text("sample", "    " + text.replace("\n", "\n    "), step)

    def close(self, failed: bool) -> None:
        self.writer.close()


def wandb_module() -> ModuleType:
    """The wandb package, or one clear line when it is missing."""
    try:
        import wandb
    except ImportError as e:
        # --no-wandb: a resume of a --wandb run keeps it without the flag being given
        raise NanoQwenError("--wandb needs the wandb package: pip install wandb (or train with --no-wandb; "
                            "metrics.jsonl and loss.png are written either way)") from e
    return wandb


def check_wandb(project: str) -> None:
    """One clear line now, before data is prepared and the model built, for a project name W&B refuses or
    (online) a missing login; on a terminal, W&B asks for the key now. Rank 0 alone logs in, as it alone
    starts the W&B run; every rank stops with its line."""
    wandb = wandb_module()
    try:
        wandb.Settings(project=project)
    except wandb.errors.Error as e:
        raise NanoQwenError(f"--wandb-project: {first_line(e)}") from None
    # Offline and disabled need no key (W&B's login would only warn that it cannot verify one)
    if os.environ.get("WANDB_MODE", "online").lower() in ("offline", "dryrun", "disabled"):
        return

    def login() -> None:  # the key from the environment, ~/.netrc or W&B's settings; no network
        with starting_wandb(wandb):
            wandb.login(verify=False)

    on_rank0(login)


@contextmanager
def starting_wandb(wandb: ModuleType) -> Iterator[None]:
    """W&B's refusal to log in or start a run (no key, no network) as one line. W&B keeps the settings it failed
    with for a retry in this process: they are torn down first."""
    try:
        yield
    except wandb.errors.Error as e:
        wandb.teardown()
        raise NanoQwenError(f"--wandb could not start a W&B run ({first_line(e)}); log in with `wandb login`, set "
                            "WANDB_MODE=offline to keep it in the run folder for `wandb sync`, or train with "
                            "--no-wandb") from None


class WandbLog(Tracker):
    """A W&B run named after the run folder, its files in RUN/wandb. `run_id` (kept in the training state)
    continues the W&B run of a resumed one. Each record is logged with its `step` as a value, W&B's x-axis
    here: W&B's own step may only grow, and a resumed run logs again the steps after its last save (they show
    twice there, with the same values on CPU; TensorBoard and metrics.jsonl drop the first ones)."""

    def __init__(self, run_dir: Path, project: str, run_id: str | None, config: dict[str, Any]) -> None:
        self.wandb = wandb_module()
        with starting_wandb(self.wandb):
            self.run = self.wandb.init(project=project, name=run_dir.resolve().name, dir=str(run_dir), id=run_id,
                                       resume="allow", config=config,
                                       settings=self.wandb.Settings(console="off", quiet=True))  # no terminal capture
        self.run.define_metric("*", step_metric="step")
        self.id: str = self.run.id
        # For the closing report: the run's page, or offline the command that uploads it (W&B's own lines about
        # either scroll away with the progress)
        self.where = f"`wandb sync {quote(str(Path(self.run.dir).parent))}` uploads it" if self.run.offline \
            else self.run.url

    def record(self, record: dict[str, Any]) -> None:
        self.run.log(self.charted(record))

    def sample(self, step: int, text: str) -> None:
        self.run.log({"step": step, "sample": self.wandb.Html(f"<pre>{html.escape(text)}</pre>")})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        # W&B's service process (and its address in os.environ) outlives a run: a later run in this process (a
        # notebook, the tests) would reuse its settings, and processes started from here would attach to it.
        self.wandb.teardown()

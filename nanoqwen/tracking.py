"""TensorBoard, when asked for (`nanoqwen train --tensorboard`): every metrics.jsonl record as scalars and
every sample as text, in RUN/tensorboard, so `tensorboard --logdir runs` compares runs live.

metrics.jsonl stays the record of truth; this mirrors it. The `tensorboard` package is optional:
asking for it without the package is one clear line before training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanoqwen.errors import NanoQwenError

FOLDER = "tensorboard"


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


class TensorBoardLog:
    def __init__(self, run_dir: Path, last_saved_step: int) -> None:
        # A resumed run writes again every step after its last save; purge_step tells TensorBoard to drop
        # what the interrupted process had logged from there on, so each step shows once, as metrics.jsonl has it.
        self.writer = summary_writer_class()(log_dir=str(run_dir / FOLDER), flush_secs=30,
                                             purge_step=last_saved_step + 1 if last_saved_step else None)

    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (its `step` and numbers)."""
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(scalar_tag(key), value, record["step"])

    def sample(self, step: int, text: str) -> None:
        # TensorBoard renders text as markdown: indented, the sample keeps its lines and spacing
        self.writer.add_text("sample", "    " + text.replace("\n", "\n    "), step)

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.close()  # flushes: the last steps before an error are the ones worth seeing

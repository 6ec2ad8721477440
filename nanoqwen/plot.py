"""`nanoqwen plot RUN`: loss.png (train and validation loss against the step) from metrics.jsonl."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoqwen.errors import NanoQwenError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if Path(run_dir).is_file():  # metrics.jsonl itself, say: the folder that holds it is the run
        raise NanoQwenError(f"{run_dir} is a file; give the run folder that holds it ({Path(run_dir).parent})")
    if not path.is_file():
        what = f"{path} does not exist" if Path(run_dir).is_dir() else f"{run_dir} does not exist"
        raise NanoQwenError(f"{what}; give a run folder written by `nanoqwen train`")
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break  # a record being written right now, or cut short when its run was killed
            raise NanoQwenError(f"{path}:{number} is not JSON ({e}); delete that line") from e
    return records


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def smoothing_for(points: int) -> float:
    """The moving average's beta for a curve of `points` train records: a window of about a twentieth of
    the run (0.9, ten records, at 200 and over), so a short run's curve does not lag behind its falling loss."""
    return min(0.9, max(0.0, 1 - 20 / max(points, 1)))


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss.png for a run folder (or `out`) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = [r for r in read_metrics(run_dir) if isinstance(r, dict) and isinstance(r.get("step"), int)]
    path = Path(out) if out else Path(run_dir) / "loss.png"
    if path.is_dir():  # a folder to put it in, as `cp` takes one
        path = path / "loss.png"
    if path.is_dir() or not path.parent.is_dir():
        raise NanoQwenError(f"cannot write the plot to {path}: give --out a file name in an existing folder")
    train, val = ([(r["step"], r[key]) for r in records
                   if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
                  for key in ("train_loss", "val_loss"))
    if not (train or val):
        raise NanoQwenError(f"{Path(run_dir) / 'metrics.jsonl'} holds no losses yet; plot once the run has logged "
                            "a step")
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(list(losses), smoothing_for(len(losses))), color="tab:blue", label="train (smoothed)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
        best = min(val, key=lambda sv: sv[1])
        ax.annotate(f"best {best[1]:.3f}", best, textcoords="offset points", xytext=(0, 10), ha="center")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on a short run's axis
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{Path(run_dir).resolve().name}")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix or '.png'}")  # the suffix picks the image format
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    except ValueError as e:  # an image format matplotlib does not know
        raise NanoQwenError(f"cannot write {path}: {e}; use .png, .pdf or .svg") from None
    finally:
        plt.close(fig)
    tmp.replace(path)  # whole or absent
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (holds metrics.jsonl)")
    p.add_argument("--out", help="image path (default: RUN/loss.png)")


def run(args: argparse.Namespace) -> int:
    print(f"wrote {plot_run(args.run, args.out)}")
    return 0

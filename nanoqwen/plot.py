"""`nanoqwen plot RUN [RUN ...]`: loss.png (train and validation loss) from metrics.jsonl, or several runs'
curves in one figure to compare them, against the step, the tokens seen or the training time."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from nanoqwen.errors import NanoQwenError
from nanoqwen.io import atomic_file, folder_of_runs_refusal, is_json_number, runs_inside

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if Path(run_dir).is_file():  # metrics.jsonl itself, say: the folder that holds it is the run
        raise NanoQwenError(f"{run_dir} is a file; give the run folder that holds it ({Path(run_dir).parent})")
    if not path.is_file():
        if (Path(run_dir).parent / "metrics.jsonl").is_file():  # its best/ or last/, as sample and chat take
            raise NanoQwenError(f"{run_dir} is inside a run folder; give the run folder ({Path(run_dir).parent}), "
                                "which holds metrics.jsonl")
        runs = runs_inside(Path(run_dir))
        if runs:  # runs/, given for the runs in it
            raise folder_of_runs_refusal(Path(run_dir), "one of them, or several to compare in one figure", runs)
        what = f"{path} does not exist" if Path(run_dir).is_dir() else f"{run_dir} does not exist"
        raise NanoQwenError(f"{what}; give a run folder written by `nanoqwen train`")
    text = path.read_text(encoding="utf-8", errors="replace")
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


Curves = tuple[list[tuple[float, float]], list[tuple[float, float]]]  # train and val (x, loss) points
# The x-axes a run's curves can be drawn against: (metrics.jsonl key, scale, axis label). Runs of other batch
# sizes compare by tokens; optimizers or setups of other speeds (Muon's slower steps) by time.
X_AXES = {"step": ("step", 1.0, "step"), "tokens": ("tokens", 1.0, "tokens seen"),
          "minutes": ("elapsed_s", 1 / 60, "training time (minutes)")}


def loss_curves(records: list[dict], x: str = "step") -> Curves:
    """The (x, loss) points of the train and the val loss in `records`, x as X_AXES names it."""
    key, scale, _ = X_AXES[x]

    def finite(value: object) -> bool:  # NaN and Infinity parse as floats (older files, other writers): no point
        return is_json_number(value) and math.isfinite(value)  # type: ignore[arg-type]

    def points(loss: str) -> list[tuple[float, float]]:
        return [(r[key] * scale, r[loss]) for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)
                and finite(r.get(key)) and finite(r.get(loss))]

    return points("train_loss"), points("val_loss")


def common_folder(dirs: list[Path]) -> Path:
    """The folder that holds all of `dirs`, as they were given where it can (runs/a and runs/b: runs); the
    current folder for runs that only the filesystem's root holds (/tmp/a and /data/b), where a user cannot write."""
    try:
        folder = Path(os.path.commonpath(dirs))
    except ValueError:  # relative and absolute paths mixed
        folder = Path(os.path.commonpath([d.resolve() for d in dirs]))
    return Path(".") if folder.parent == folder else folder


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None, x: str = "step") -> Path:
    """Draw the loss curves of one run (RUN/loss.png by default) or of several in one figure (compare.png in
    the folder that holds them all, by default) and return the image's path."""
    dirs = [Path(d) for d in run_dirs]
    for i, d in enumerate(dirs):  # its curves drawn twice, in two colors, the figure written into it
        if any(d.resolve() == other.resolve() for other in dirs[:i]):
            raise NanoQwenError(f"{d} is given twice; give each run once")
    records = [read_metrics(d) for d in dirs]
    curves = [loss_curves(r, x) for r in records]
    for d, run_records, (train, val) in zip(dirs, records, curves):
        if not (train or val):
            if x != "step" and any(loss_curves(run_records)):  # losses, but not the x: a run from before it was kept
                raise NanoQwenError(f"{d / 'metrics.jsonl'} has no {X_AXES[x][0]} (written by an older nanoqwen); "
                                    "plot it against the step: --x step")
            raise NanoQwenError(f"{d / 'metrics.jsonl'} holds no losses yet; plot once the run has logged a step")
    default = dirs[0] / "loss.png" if len(dirs) == 1 else common_folder(dirs) / "compare.png"
    path = Path(out) if out else default
    if path.is_dir():  # a folder to put it in, as `cp` takes one
        path = path / default.name
    # "plots/" names a folder even where there is none (Path drops the slash: it would be written as a file "plots")
    missing_folder = out is not None and str(out).endswith(("/", os.sep)) and not Path(out).is_dir()
    if path.is_dir() or not path.parent.is_dir() or missing_folder:
        raise NanoQwenError(f"cannot write the plot to {out if missing_folder else path}: give --out a file name in "
                            "an existing folder")
    names = [d.resolve().name for d in dirs]
    if len(set(names)) < len(names):  # runs/a/x and runs/b/x: the paths as given tell them apart
        names = [str(d) for d in dirs]
    fig = loss_figure(names, curves, x)
    import matplotlib.pyplot as plt  # after loss_figure chose the file-only backend

    try:
        with atomic_file(path, "wb") as f:  # whole or absent
            fig.savefig(f, format=path.suffix[1:] or "png", dpi=120, bbox_inches="tight")  # the suffix: the format
    except ValueError as e:  # an image format matplotlib does not know
        raise NanoQwenError(f"cannot write {path}: {e}; use .png, .pdf or .svg") from None
    finally:
        plt.close(fig)
    return path


def loss_figure(names: list[str], curves: list[Curves], x: str) -> Figure:
    """One run: its raw and smoothed train loss in blue, val in orange, the best val marked. Several: a
    color per run, its smoothed train loss and its val loss (dashed, the best in the legend)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    one = len(names) == 1
    # One smoothing for all the runs, the longest one's: the same losses draw the same curve, however long each
    # run went on (a run stopped early, smoothed over its own shorter window, ran ahead of its longer twin).
    beta = smoothing_for(max(len(train) for train, _ in curves))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, (train, val)) in enumerate(zip(names, curves)):
        train_color, val_color = ("tab:blue", "tab:orange") if one else (f"C{i % 10}", f"C{i % 10}")
        # Past ten runs the colors come round again: each round of ten gets its own line style and marker.
        style, marker = ("-", "--", ":", "-.")[i // 10 % 4], "osD^"[i // 10 % 4]
        if train:
            xs, losses = zip(*train)
            if one:  # the raw curve behind the smoothed one (several runs' would hide each other)
                ax.plot(xs, losses, color=train_color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, smooth(list(losses), beta), style, color=train_color,
                    label="train (smoothed)" if one else f"{name} train")
        if val:
            xs, losses = zip(*val)
            best = min(val, key=lambda point: point[1])
            ax.plot(xs, losses, "o-" if one else marker + "--", color=val_color, markersize=6 if one else 4,
                    label="validation" if one else f"{name} val (best {best[1]:.3f})")
            if one:
                ax.annotate(f"best {best[1]:.3f}", best, textcoords="offset points", xytext=(0, 10), ha="center")
    ax.set_xlabel(X_AXES[x][2])
    if x == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on a short run's axis
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(names[0] if one else "train and val loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=None if len(names) <= 2 else "small")
    return fig


def plot_run(run_dir: str | Path) -> Path:
    """loss.png of one run against the step (what `nanoqwen train` draws as it ends)."""
    return plot_runs([run_dir])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder (holds metrics.jsonl); several: their curves "
                                                        "in one figure")
    p.add_argument("--x", default="step", choices=list(X_AXES),
                   help="what the curves are drawn against (default: step; tokens compares runs of other batch "
                        "sizes, minutes those of other speeds)")
    p.add_argument("--out", help="image path or folder (default: RUN/loss.png; several runs: compare.png in the "
                                 "folder holding them)")


def run(args: argparse.Namespace) -> int:
    print(f"wrote {plot_runs(args.runs, args.out, args.x)}")
    return 0

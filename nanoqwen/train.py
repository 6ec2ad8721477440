"""`nanoqwen train`: one loop for CPU, one GPU and torchrun (DDP, or FSDP2 with --fsdp).

    nanoqwen train                                   # cpu preset (GPU: demo) on the built-in Shakespeare
    nanoqwen train --dataset my_texts/ --max-minutes 30
    torchrun --nproc_per_node 8 -m nanoqwen train --preset tinystories-283m --dataset tinystories
    nanoqwen train --resume runs/NAME                # continues exactly where it stopped
    nanoqwen train --init-from Qwen3-0.6B/ --dataset my_texts/   # a new run from a checkpoint's weights

Settings come from, lowest first: TrainConfig's defaults, the preset's "train" section, the flags.
A run folder holds config.json (the run), metrics.jsonl, samples.txt, loss.png, best/ and last/
(Hugging Face checkpoints); last/ also holds train_state.json (loop state, plain JSON) and
train_state.pt (optimizer, grad scaler, RNG), written in the same atomic step as its weights.
Where a run's settings, data and folder come from (new, --init-from or resumed): runs.py.

Reading it to learn: `train_step` and `optimizer_step` are the learning itself (forward, loss, backward per
micro-batch, then clip and step); `train` is the loop around them (eval, samples, saves, stops); the rest is
setting up, resuming and reporting.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import math
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cache, cached_property, partial
from pathlib import Path
from shlex import quote
from typing import Any

import numpy as np
import torch

from nanoqwen.checkpoint import (
    checkpoint_step,
    load_model,
    load_train_state,
    new_model_config,
    read_generation_file,
    save_best,
    save_last,
    seed_dropout,
    warn_of_special_ids,
)
from nanoqwen.cli import list_presets
from nanoqwen.config import (
    BEST_DTYPES,
    LOSS_TARGETS,
    LoopState,
    ModelConfig,
    TrainConfig,
)
from nanoqwen.data.loader import BatchLoader, ChatMarks, TokenSplit, assistant_targets, check_token_ids
from nanoqwen.data.sources import SOURCES_HELP
from nanoqwen.distributed import (
    DistInfo,
    add_device_arguments,
    all_reduce,
    check_host_memory,
    free_host_memory,
    from_rank0,
    init_distributed,
    job_error_line,
    on_rank0,
    resolve_dtype,
    reuse_freed_memory,
    say_once,
    shutdown_distributed,
)
from nanoqwen.errors import Interrupted, NanoQwenError, OneCorpus, counted, decimal_number, whole_number
from nanoqwen.evaluate import assistant_scoring, evaluate_tokens, readable
from nanoqwen.generate import SAMPLING_DEFAULTS, SamplingParams, check_fits, for_stdout, generate, prompt_ids
from nanoqwen.io import (
    ReaderMayLeave,
    hold_lock,
    json_line,
    real_path,
    release_lock,
    remove_orphans,
    write_json,
)
from nanoqwen.loss import IGNORE_INDEX, CausalLMLoss
from nanoqwen.model import Qwen3
from nanoqwen.optim import OPTIMIZERS, SCHEDULES, build_optimizer, lr_at, set_lr, wsd_decay_start
from nanoqwen.runs import (
    FINETUNE_SEQ_LEN,
    FINETUNE_TRAIN,
    RUN_CONFIG_FORMAT,
    Changes,
    carried_files,
    check_resumed_data,
    check_seq_len,
    data_digest,
    data_place,
    data_splits,
    holds_conversations,
    load_model_config,
    new_run,
    note_chat_template,
    note_vocab_change,
    read_run_config,
    record_launch,
    resumed_run,
    run_config,
    truncate_metrics,
    truncate_samples,
    warming_up,
    warmup_cut,
)
from nanoqwen.tokenizer import IM_END, IM_START, Tokenizer, load_tokenizer
from nanoqwen.tracking import FOLDER as TENSORBOARD_FOLDER
from nanoqwen.tracking import Display, TensorBoardLog, Tracker, WandbLog, flops_per_token, peak_flops


# -- command line ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", help="model preset by name (listed below; default: cpu, or demo on a CUDA GPU)")
    list_presets(p)
    model.add_argument("--config", help="a preset JSON file ({\"model\": {config.json fields}, \"train\": {flag "
                                        "defaults, max_steps for --max-steps}}), or a checkpoint's config.json (its "
                                        "architecture, new weights)")
    model.add_argument("--init-from", metavar="DIR",
                       help="start from the weights of a Qwen3 checkpoint folder (a run's best/, official "
                            "Qwen3 weights) instead of a preset's random ones; its tokenizer prepares "
                            "--dataset, and the training defaults are fine-tuning ones (lr 3e-5, AdamW, "
                            "500 steps of 16 x 1024 tokens)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", help="a prepared folder (from `nanoqwen prepare`)")
    data.add_argument("--dataset", action=OneCorpus,
                      help="a corpus to prepare first into data/NAME-HASH-TOKENIZER (a built-in one: "
                           f"data/NAME-TOKENIZER unless read with another --text-column): {SOURCES_HELP} "
                           f"(default: the preset's, else {TrainConfig.dataset})")
    p.add_argument("--tokenizer", help="with --dataset: qwen3, bpe:N or a tokenizer folder (default: the preset's, "
                                      f"else {TrainConfig.tokenizer}; after --init-from, the checkpoint's)")
    p.add_argument("--text-column", metavar="NAME",
                   help="with --dataset: the field or column holding the text in .jsonl/.json/.csv/.tsv/.parquet "
                        "files, datasets folders and hub data (default: text; data.text: a field inside an object; "
                        "records without one are read as chats from messages or conversations)")
    p.add_argument("--out", help="run folder (default: runs/PRESET-TIME, or runs/NAME-TIME after --init-from NAME)")
    p.add_argument("--resume", nargs="?", const="", metavar="RUN",
                   help="continue the run in RUN (or in --out) exactly where its last/ checkpoint left it")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model field, e.g. --set num_hidden_layers=4")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("dataset", "tokenizer"):
            continue
        flag, kind = f"--{f.name.replace('_', '-')}", re.sub(r" \| None", "", str(f.type))
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_field_help(f.name))
            continue
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "best_dtype": BEST_DTYPES,
                   "loss_on": LOSS_TARGETS}.get(f.name)
        p.add_argument(flag, type={"int": whole_number, "float": decimal_number, "str": str}[kind], default=None,
                       choices=choices, help=_field_help(f.name))
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward: less memory, about a third more compute (a resume keeps "
                        "the run's unless given)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard parameters, gradients and "
                                                       "optimizer state (FSDP2) instead of replicating (DDP)")
    add_device_arguments(p, dtype_help="autocast dtype (default: bfloat16 on CUDA, float16 where it lacks "
                                       "bfloat16, float32 on CPU and MPS)")


@cache
def _train_config_source() -> str:
    return inspect.getsource(TrainConfig)  # parses all of config.py: once, not once a flag (0.6 s a parser)


def _field_help(name: str) -> str:
    """The docstring under a TrainConfig field, for --help (one source of truth for both), with its default: a
    run from --init-from has no preset, and takes the fine-tuning defaults where they differ."""
    found = re.search(rf"\n    {name}: [^\n]*\n    \"\"\"(.*?)\"\"\"", _train_config_source(), re.S)
    default = getattr(TrainConfig, name)
    # (no one can type Python's None: it is "unset" on the command line)
    said = (found.group(1) if found else "").replace("(None: ", "(unset: ")
    finetune = {**FINETUNE_TRAIN, "seq_len": f"{FINETUNE_SEQ_LEN} or the context, if shorter"}.get(name, default)
    after_init = "" if finetune == default else f"; after --init-from, {finetune!r}".replace("'", "")
    return f"{said} (default: the preset's, else {'unset' if default is None else repr(default)}{after_init})"


# -- the run --------------------------------------------------------------------------------------
class StopSignal:
    """SIGINT/SIGTERM ask the loop to stop after the current step and save; a second one aborts.

    Under torchrun (`patient`) a second one is noted like the first, and the handlers stay until the process
    exits: torchrun passes on each signal it gets to every worker, so a worker that got the signal itself (a job
    scheduler such as SLURM signals every process of the job) hears it twice, and it signals the workers still
    running when one of them has stopped, in the middle of rank 0's save or closing report. A worker that does
    not end is still ended: torchrun kills it after its --shutdown_timeout (30 s). There SIGHUP stops it too:
    torchrun handles a hangup itself (undoing nohup's ignore) and passes it on, which ended every worker unsaved;
    a worker left to ignore it (torchrun --signals_to_handle without SIGHUP, under nohup) still does."""

    def __init__(self, patient: bool = False) -> None:
        self.name: str | None = None
        self.patient = patient
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT, signal.SIGTERM]
            hangup = getattr(signal, "SIGHUP", None)  # (none on Windows)
            if self.patient and hangup is not None and signal.getsignal(hangup) != signal.SIG_IGN:
                signals.append(hangup)
            for sig in signals:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.name is not None and not self.patient:
            raise SecondSignal(signum)
        self.name = self.name or signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        if self.patient:
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class SecondSignal(KeyboardInterrupt):
    """The signal (`signum`) that aborted the stop, and the save, a first one asked for."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Run:
    """Everything the loop touches, set up by `setup()`."""

    args: argparse.Namespace
    info: DistInfo
    cfg: TrainConfig
    out: Path
    data: Path
    preset: str
    model: Qwen3
    train_module: torch.nn.Module
    optimizer: Any
    scaler: torch.amp.GradScaler
    tokenizer: Tokenizer
    loader: BatchLoader
    val: TokenSplit
    amp_dtype: torch.dtype
    state: LoopState = field(default_factory=LoopState)
    lock: Any = None  # the open lock file of the run folder (rank 0): no second process writes into it
    generation: dict | None = None  # the generation_config.json checkpoints carry (None: nanoqwen's defaults)
    decay_compressed: bool = False  # --fit-to-time shortened the decay (said once)
    empty_steps: int = 0  # --loss-on assistant: steps whose whole batch held no assistant token (this session)

    @property
    def total_steps(self) -> int:
        """Where the schedule ends: max_steps, or less to fit --max-minutes."""
        return self.state.fitted_steps or self.cfg.max_steps

    @property
    def fitted_short(self) -> bool:
        """Whether --fit-to-time ended the schedule short of max_steps: more time trains such a run further (a
        --max-minutes given to a resume fits the schedule anew, up to max_steps), as more steps do."""
        return self.state.fitted_steps is not None and self.state.fitted_steps < self.cfg.max_steps

    @property
    def warmup(self) -> int:
        return self.cfg.warmup if self.state.fitted_warmup is None else self.state.fitted_warmup

    @property
    def seq_len(self) -> int:
        assert self.cfg.seq_len is not None
        return self.cfg.seq_len

    @cached_property
    def chat_data(self) -> bool:
        """Whether it trains on conversations (samples write one; the closing lines point to `chat`)."""
        return holds_conversations(self.data)

    @cached_property
    def val_scoring(self) -> tuple[torch.Tensor, int] | None:
        """Under --loss-on assistant, which predictions of the validation subset count (as in training) and
        the bytes of text they stand for (an added token's none, as prepare counts them); else None: all."""
        if self.loader.assistant is None:
            return None
        return assistant_scoring(val_subset(self), self.loader.assistant, self.tokenizer)

    @cached_property
    def val_bytes(self) -> int:
        """UTF-8 bytes of the text the validation subset's predicted tokens stand for (bits per byte)."""
        return self.tokenizer.text_bytes(val_subset(self)[1:].numpy())

    @cached_property
    def sample_prompt(self) -> str:
        """--sample-prompt, or where the data's documents start: a new line, or a new conversation (the empty
        prompt: <|endoftext|>). Under --loss-on assistant, the first validation conversation up to its first
        `<|im_start|>assistant` line: such a model never learns to write the user's turns, so a sample from a
        conversation's start was noise (a stray answer, then <|im_end|> over and over)."""
        if self.cfg.sample_prompt is not None:
            return self.cfg.sample_prompt
        if self.loader.assistant is not None:
            question = first_question(self.val.tokens, self.loader.assistant, self.seq_len // 2)
            if question:
                return self.tokenizer.decode(question)
        return "" if self.chat_data else "\n"

    def autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)


def setup(args: argparse.Namespace) -> Run:
    locks: list[Any] = []
    try:
        return build_run(args, locks)
    except BaseException:
        for lock in locks:  # a failed start leaves the folder free (to a retry in the same process too)
            release_lock(lock)
        raise


def build_run(args: argparse.Namespace, locks: list[Any]) -> Run:
    info = init_distributed(args.device)
    if args.resume is not None:
        cfg, preset_name, data, out, changes = resumed_run(args, info)
        lock = claim(out)  # before anything is read that a writer may change
        locks += [lock] if lock else []
        for folder in ("last", "best"):  # one moved aside by a save that was killed comes back (best/: before
            remove_orphans(real_path(out / folder))  # continue_run compares its step with last/'s)
        resume_dir: Path | None = out / "last"
        model_config = load_model_config(out / "last")
        check_resumed_data(out, data, info.is_main)
    else:
        preset, cfg, data, out = new_run(args, info)
        lock = claim(out)
        locks += [lock] if lock else []
        preset_name, resume_dir, changes = preset.name, None, None
        # A checkpoint's config is whole (its special ids included); a preset's takes the tokenizer's.
        model_config = (preset.model if args.init_from
                        else new_model_config(preset.model, args.set, load_tokenizer(data)))
        if info.is_main and not args.init_from:
            note_vocab_change(preset, model_config, data, args.set)
    cfg.seq_len = cfg.seq_len or model_config.max_position_embeddings
    check_seq_len(cfg.seq_len, model_config, can_set=resume_dir is None)  # a resume takes no --set
    device = info.device
    if device.type == "cpu":
        reuse_freed_memory()
    cfg.compile = default_compile(device) if cfg.compile is None else cfg.compile  # saved: a resumed run alike
    micro_batch = cfg.micro_batch or cfg.batch_size // info.world_size  # not saved: a resume may change processes
    loader = BatchLoader(TokenSplit.open(data, "train"), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                         micro_batch=micro_batch, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                         device=device, vocab_size=model_config.vocab_size, where=f"{data}/train.bin",
                         assistant=chat_marks(data) if cfg.loss_on == "assistant" else None)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":  # fp32 weights and gradients, and AdamW's two moments (Muon: one, on matrices)
        per_param, held = (4, "its weights") if args.fsdp else \
            ((12, "weights, gradients and Muon state") if cfg.optimizer == "muon" else
             (16, "weights, gradients and AdamW state"))
        check_host_memory(model_config.num_params(), per_param, f"training this model ({held})",
                          processes=info.processes_here)
        loader.micro_batch = micro_batch_in_memory(
            loader, model_config, per_param, given=args.micro_batch is not None,
            checkpointing=bool(args.activation_checkpointing),
            itemsize=resolve_dtype(args.dtype, device).itemsize, processes=info.processes_here,
            say=print if info.is_main else lambda line: None)
    if resume_dir is not None:
        model = load_model(resume_dir, device, torch.float32)
    elif args.init_from:
        model = load_model(args.init_from, device, torch.float32, config=model_config)
    else:
        model = build_model(model_config, device)
    model.train()
    model.activation_checkpointing = bool(args.activation_checkpointing)
    train_module = wrap_model(model, info, args, device, cfg.compile)
    seed_dropout(cfg.seed, info.rank)  # the weights drawn alike on every rank, each rank's masks its own
    amp_dtype = resolve_dtype(args.dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, device, cfg.decay_embeddings,
                                loss_scaled=scaler.is_enabled())
    source = resume_dir or (Path(args.init_from) if args.init_from else None)
    tokenizer, generation = carried_files(data, source, warn=info.is_main)
    if info.is_main and args.init_from:
        note_chat_template(tokenizer, data, Path(args.init_from))
        # as sample, chat and serve say of it (its checkpoints carry those ids); a broken generation_config.json
        # carried_files said already
        warn_of_special_ids(tokenizer, model_config, read_generation_file(args.init_from, warn=False))
    run = Run(args, info, cfg, out, data.resolve(), preset_name, model, train_module, optimizer, scaler,
              tokenizer, loader, TokenSplit.open(data, "val"), amp_dtype, lock=lock, generation=generation)
    check_samples_and_eval(run)
    if resume_dir is not None and changes is not None:
        continue_run(run, resume_dir, changes)
    else:
        on_rank0(partial(start_fresh, run))
    return run


def claim(out: Path) -> Any:
    """Rank 0's lock on the run folder (None on the others). A folder in use stops every rank with rank 0's line:
    the others would go on alone and crash in their next collective."""
    held: list[Any] = []
    on_rank0(lambda: held.append(hold_lock(out)))
    return held[0] if held else None


def continue_run(run: Run, resume_dir: Path, changes: Changes) -> None:
    """Put a resumed run's training state back, check that it has steps left, and bring its folder to where
    its last/ stands (metrics, samples, a best/ from replayed steps); `changes`: how the resume differs from
    what last/ was trained with."""
    args, cfg, info, out = run.args, run.cfg, run.info, run.out
    changed, given = changes.listed, changes.given
    load_train_state(run, resume_dir)
    if args.max_steps is not None and args.max_steps <= run.state.step:
        usable = "last/ and best/ are usable as they are" if (out / "best").is_dir() else "last/ is usable as it is"
        raise NanoQwenError(f"--max-steps {args.max_steps}: {out} is already at step {run.state.step}; give more "
                            f"steps to train it further (its {usable})")  # no best/: stopped before its first eval
    if given & {"max_steps", "max_minutes"}:  # asked for anew: wins over a length fitted to the time before
        run.state.fitted_steps = None
    if "warmup" in given:  # likewise over a warmup cut to fit that length
        run.state.fitted_warmup = None
    cut = bool(given & {"max_steps", "warmup"}) and run.warmup > run.total_steps // 2
    if cut:  # as a new run's is: a length (or warmup) set now that ends within the warmup never decayed to min_lr
        cut_note, run.state.fitted_warmup = warmup_cut(run.warmup, run.total_steps), run.total_steps // 2
    if run.state.step >= run.total_steps:
        steps = f"--max-steps (more than {run.state.step})"
        if run.fitted_short:
            raise NanoQwenError(f"{out} has done all {run.state.step} of its steps that fit in --max-minutes "
                                f"{cfg.max_minutes:g} (of its {cfg.max_steps}); give --max-minutes M to train it M "
                                f"minutes more (its schedule fitted anew to them), or {steps}")
        raise NanoQwenError(f"{out} has done all {run.state.step} of its steps; give {steps} to train it further")
    trained_patience, patience = changes.trained.early_stopping_patience, cfg.early_stopping_patience
    stopped_early = bool(trained_patience) and run.state.evals_since_best >= trained_patience
    if stopped_early and not given & {"max_steps", "early_stopping_patience"}:  # as a run that never stopped ends
        raise NanoQwenError(f"{out} stopped early at step {run.state.step} ({trained_patience} evaluations without "
                            "a better val loss); give --max-steps or --early-stopping-patience to train it further")
    # The count of evaluations without a better val loss goes on: a patience given now counts them as if the run
    # had had it all along (3 -> 5 after a stop at 3 allows 2 more; one turned on, or lowered, below the count
    # stops it at its next evaluation without a better val loss). Only a run that stopped early and goes on with
    # a patience its count already reaches (more --max-steps alone) starts afresh, or it would stop at once.
    if stopped_early and patience and run.state.evals_since_best >= patience:
        run.state.evals_since_best = 0
    # A val loss over other targets or windows is no longer comparable with the best so far: best/ starts afresh.
    rescored = [c for c in changed if c.split()[0] in ("loss_on", "seq_len", "eval_windows")]
    rescored_from = run.state.best_step if rescored and run.state.best_val_loss is not None else None
    if rescored_from is not None:
        run.state.best_val_loss, run.state.evals_since_best = None, 0

    def record_resume() -> None:  # rank 0: the flags given now hold for later resumes too
        truncate_metrics(out, run.state.step)  # a damaged file stops us here (every rank), with the run unchanged
        truncate_samples(out, run.state.step)
        saved = read_run_config(out)
        saved["train"] = dataclasses.asdict(cfg)
        saved["format"] = RUN_CONFIG_FORMAT  # train written as this nanoqwen does (a micro-batch asked for, or None)
        record_launch(saved, run)
        saved.setdefault("args", {}).update(dtype=args.dtype, activation_checkpointing=args.activation_checkpointing)
        saved.update(data_place(run))
        if "data_digest" not in saved:  # a run from before they were recorded (else check_resumed_data read it)
            saved.setdefault("data_splits", data_splits(run.data))
            saved["data_digest"] = data_digest(run.data)
        write_json(out / "config.json", saved)

    on_rank0(record_resume)
    best_from = from_rank0(checkpoint_step(out / "best") if info.is_main else None)  # rank 0 deletes it next
    if best_from is not None and best_from > run.state.step:
        # Written after last/ by a run that was killed: from steps this resume replays (perhaps otherwise).
        # The best recorded before it was overwritten by it, so the next evaluation writes best/ again.
        run.state.best_val_loss = run.state.best_step = None
        run.state.evals_since_best = 0

        def remove_best() -> None:  # rank 0
            shutil.rmtree(out / "best")
            print(f"removed {out / 'best'}: it held step {best_from}, after last/'s step {run.state.step} that "
                  "this resume goes on from; the next evaluation writes it again", flush=True)

        on_rank0(remove_best)
    if cut and info.is_main:
        print(cut_note, flush=True)
    if cfg.max_minutes and args.max_minutes is None and info.is_main:  # saved with the run: say it still holds
        print(f"--max-minutes {cfg.max_minutes:g} (the run's own) caps this invocation too; give --max-minutes "
              "to change it (0: no cap)", flush=True)
    if changed and info.is_main:  # said once nothing refuses the resume any more
        print(f"resuming {out} with {', '.join(changed)}: from here the run differs from one that never "
              "stopped", flush=True)
        if rescored_from is not None:
            print(f"the val loss is measured otherwise from here ({', '.join(rescored)}), so the next evaluation "
                  f"writes best/ afresh (it holds step {rescored_from})", flush=True)


def start_fresh(run: Run) -> None:
    """A new run's folder (rank 0): whatever a run into it left before its first save of last/ goes."""
    truncate_metrics(run.out, 0)
    truncate_samples(run.out, 0)
    shutil.rmtree(run.out / "best", ignore_errors=True)  # else `sample --model RUN/best` could load that model
    write_json(run.out / "config.json", run_config(run))


def build_model(config: ModelConfig, device: torch.device) -> Qwen3:
    """A new model with its initial weights; a model too large for the machine is one line."""
    try:
        with device:
            return Qwen3(config)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise NanoQwenError(f"not enough {device.type} memory for this model (vocab_size {config.vocab_size}, "
                            f"hidden_size {config.hidden_size}, {config.num_hidden_layers} layers); choose a "
                            "smaller preset or --set") from None


def check_samples_and_eval(run: Run) -> None:
    """What the first evaluation or the last sample would fail on, refused before any step is trained; what they
    would cut short, said once."""
    if len(run.val) < 2:
        raise NanoQwenError(f"{run.data} has no validation tokens; prepare it again with `nanoqwen prepare`")
    check_token_ids(val_subset(run), run.model.config.vocab_size, f"{run.data}/val.bin")
    if run.val_scoring is not None and not run.val_scoring[0].any():
        raise NanoQwenError(f"--loss-on assistant: the validation subset of {run.data} holds no assistant turn to "
                            "score; give more --eval-windows or prepare more conversations")
    try:
        fits = check_fits(run.model, len(prompt_ids(run.tokenizer, run.sample_prompt)), run.cfg.sample_tokens)
    except NanoQwenError as e:
        raise NanoQwenError(f"--sample-prompt: {e}") from None
    if not run.info.is_main:
        return
    # What the run does with more than it has, said once here rather than cut silently (as `sample` says it too)
    if fits < run.cfg.sample_tokens:
        print(f"note: --sample-tokens {run.cfg.sample_tokens}: at most {fits} fit in the model's context "
              f"({run.model.config.max_position_embeddings} tokens) after the sample prompt; samples stop there",
              flush=True)
    windows = run.cfg.eval_windows
    if windows * run.seq_len + 1 > len(run.val):
        print(f"note: --eval-windows {windows}: {run.data}/val.bin holds {len(run.val):,} tokens, fewer than "
              f"{windows} windows of {run.seq_len}; every evaluation scores all of it", flush=True)


def chat_marks(data: Path) -> ChatMarks:
    """The ids that frame an assistant's turn in `data`, for --loss-on assistant; one line if it has none."""
    from nanoqwen.data.prepare import load_meta

    tokenizer = load_tokenizer(data)
    ids = [tokenizer.token_id(IM_START), tokenizer.token_id(IM_END)]
    if not load_meta(data).get("conversations") or None in ids:
        raise NanoQwenError(f"--loss-on assistant needs conversations, and {data} holds none; prepare chat records "
                            "(see the README's recipe) or leave --loss-on out")
    texts = tokenizer.hf.decode_batch([[i] for i in range(tokenizer.vocab_size)])
    newline = frozenset(i for i, text in enumerate(texts) if text.startswith("\n"))
    return ChatMarks(ids[0], ids[1], tokenizer.eot_id, tuple(tokenizer.encode("assistant")), newline)


def first_question(tokens: np.ndarray, marks: ChatMarks, limit: int) -> list[int]:
    """The ids of the first conversation in `tokens` that reaches an assistant's turn within `limit` tokens of
    its start, through its `<|im_start|>assistant` line (what `chat` prompts with); [] if none does."""
    head = np.asarray(tokens[:1 << 14])  # the first conversations are enough
    wrote = assistant_targets(head, 0, len(head), marks)
    for at in np.flatnonzero(wrote[1:] & ~wrote[:-1]) + 1:  # where each answer begins
        ends = np.flatnonzero(head[:at] == marks.eot)
        start = int(ends[-1]) + 1 if ends.size else 0
        if at - start <= limit:
            return head[start:at].tolist()
    return []


def wrap_model(model: Qwen3, info: DistInfo, args: argparse.Namespace, device: torch.device,
               compile_model: bool) -> torch.nn.Module:
    """The loss module, compiled, and wrapped in DDP or sharded with FSDP2 under torchrun."""
    objective = CausalLMLoss(model)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # The mesh of the run's device: fully_shard's default takes the machine's accelerator, so a --device cpu
        # job on a GPU machine would have its shards moved to cuda:0 (every rank's) under a gloo group.
        mesh = init_device_mesh(device.type, (info.world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embeddings, final norm and head, used by the loss after forward
    if compile_model:
        objective.compile()  # the model part; the chunked loss runs eagerly
    if info.distributed and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    return objective


def default_compile(device: torch.device) -> bool:
    """torch.compile on CUDA only. On a CPU the step of a small model is mostly large matmuls that
    inductor leaves to MKL: on the 2-core test machines the compiled `cpu` preset trained between 6% slower
    and 8% faster (bench/README.md), after about 20 s of compiling and with a C++ compiler it needs, for
    8-15% less peak memory. Not worth it by default there; `--compile` asks for it."""
    return device.type == "cuda"


def append_line(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(text)


# -- the loop -------------------------------------------------------------------------------------
def train_step(run: Run) -> tuple[float | None, float]:
    """One optimizer step over the global batch; returns (mean train loss, learning rate), the loss None where
    the batch held no target (--loss-on assistant) and nothing was trained."""
    cfg, state = run.cfg, run.state
    lr = lr_at(state.step, max_lr=cfg.lr, min_lr=cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr,
               warmup=run.warmup, total=run.total_steps, schedule=cfg.schedule)
    set_lr(run.optimizer, lr)
    # Assistant-only targets differ in number between micro-batches: each one's mean is weighted by its share of
    # the step's targets (over every process: DDP averages), so the step's loss is the mean over all of them. A
    # batch with none has nothing to teach: no step (momentum and decay would still move the weights), no loss.
    in_step = run.loader.targets_in_step(state.step) if run.loader.assistant else None
    loss: float | None = None
    if in_step != 0:
        loss = optimizer_step(run, run.loader.micro_batches(state.step), in_step)
    else:
        run.empty_steps += 1
    state.step += 1
    state.tokens += cfg.batch_size * run.seq_len
    return loss, lr


def optimizer_step(run: Run, batches: list[tuple[torch.Tensor, torch.Tensor]], in_step: int | None) -> float:
    """Forward, backward and update over this process's micro-batches; returns the mean loss (every process's)."""
    loss_sum = torch.zeros((), device=run.info.device)
    for i, (inputs, targets) in enumerate(batches):
        last = i == len(batches) - 1
        with sync_gradients(run, last), run.autocast():
            loss = run.train_module(inputs, targets)
            if in_step is None:
                loss = loss / len(batches)  # equal-size micro-batches: mean of means
            else:
                loss = loss * ((targets != IGNORE_INDEX).sum() * run.info.world_size / in_step)
        run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not fp16's loss-scaled ones
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return all_reduce(loss_sum.item(), "mean", run.info.device)


def sync_gradients(run: Run, sync: bool) -> AbstractContextManager[Any]:
    """Gradient all-reduce only on the last micro-batch of a step."""
    if run.args.fsdp:
        run.model.set_requires_gradient_sync(sync)
        return nullcontext()
    if run.info.distributed and not sync:
        return run.train_module.no_sync()
    return nullcontext()


def val_subset(run: Run) -> torch.Tensor:
    """The fixed validation subset every evaluation scores: eval_windows windows of seq_len tokens."""
    return run.val.prefix(run.cfg.eval_windows * run.seq_len + 1)


def evaluate(run: Run) -> dict[str, float]:
    """Loss, accuracy, perplexity and bits per byte on the fixed validation subset (every rank the same)."""
    tokens = val_subset(run)  # setup saw that there are some, with ids the model has
    # Evaluation materializes logits: keep a batch of them under ~1 GiB.
    batch = max(1, min(run.loader.micro_batch, (1 << 28) // (run.seq_len * run.model.config.vocab_size)))
    scored, num_bytes = run.val_scoring or (None, run.val_bytes)
    with run.autocast():
        result = evaluate_tokens(run.model, tokens, num_bytes, context=run.seq_len, batch_size=batch, scored=scored)
    run.model.train()
    return result


def sample(run: Run) -> str:
    """A sample of `sample_tokens`. A model of conversations writes one from its start, its turns' control
    tokens shown (a sample that stopped at the end of one turn showed a reply to no question)."""
    chats, prompt = run.chat_data, run.sample_prompt
    whole = chats and run.loader.assistant is None  # --loss-on assistant: one answer, ended by <|im_end|>
    params = SamplingParams(max_new_tokens=run.cfg.sample_tokens, **SAMPLING_DEFAULTS,  # sample's defaults
                            stop_token_ids=[run.tokenizer.eot_id] if whole else run.tokenizer.stop_ids,
                            skip_special_tokens=not chats, seed=run.cfg.seed)
    with run.autocast():
        text = generate(run.model, run.tokenizer, [prompt], params)[0].text
    run.model.train()
    return prompt + text


def train(run: Run) -> dict[str, Any]:
    """The loop. Returns a summary: why it stopped, the last evaluation, the last sample."""
    cfg, state, main = run.cfg, run.state, run.info.is_main
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
    tokens_per_step = cfg.batch_size * run.seq_len
    flops, peak = flops_per_token(run.model.config, run.seq_len), peak_flops(run.info.device, run.amp_dtype)
    summary: dict[str, Any] = {"stopped": "max_steps", "sample": None, "eval": None}
    with StopSignal(patient=run.info.distributed) as stop, ExitStack() as opened:
        trackers = open_trackers(run, opened)  # before the progress bar: one that fails to start is one clean line
        summary["wandb"] = next((t.where for t in trackers if isinstance(t, WandbLog)), None)
        display = Display(main, state.step, run.total_steps, cfg.log_interval)
        start = tick = after_first = time.perf_counter()
        recent_steps_s: deque[float] = deque(maxlen=10)  # wall time of the last steps (a machine that slows down)
        first_step = state.step + 1
        fit_resumed_schedule(run, display)
        while state.step < run.total_steps:
            t0 = time.perf_counter()
            with explain_out_of_memory(run):
                train_loss, lr = train_step(run)
            now = time.perf_counter()
            state.elapsed_s += now - tick  # wall time, evaluation and saving included
            if state.step == first_step:  # it pays for compilation and warm-up: time the others
                after_first = now
                state.first_steps, state.first_steps_s = state.first_steps + 1, state.first_steps_s + now - tick
            else:
                recent_steps_s.append(now - tick)
            tick, tok_s = now, tokens_per_step / (now - t0)
            if train_loss is not None and not math.isfinite(train_loss):
                raise NanoQwenError(f"the train loss became {train_loss} at step {state.step}; "
                                    "lower --lr or raise --warmup")
            if cfg.fit_to_time and cfg.max_minutes and state.step >= first_step + 5:
                # the mean wall time of a step so far (evaluations included): steady under bursty load
                step_s = (now - after_first) / (state.step - first_step)
                # the median: one step that evaluated or saved is no slowdown of the machine
                fit_schedule(run, step_s, statistics.median(recent_steps_s),
                             cfg.max_minutes * 60 - (now - start), display)
            record = step_record(run, train_loss, lr, tok_s, flops, peak)
            time_up = cfg.max_minutes is not None and now - start >= cfg.max_minutes * 60
            stopped = agreed_stop(run, time_up, stop.name)
            if state.step >= run.total_steps:
                # the run is done with this step: it ends as planned, a signal's or the time cap's stop with it (a
                # resume, with no steps left, could not make up the final evaluation and sample; the time stopped
                # no step)
                stopped = None
            summary["stopped"] = stopped or summary["stopped"]
            interrupted = stopped is not None and stopped.startswith("signal")  # save and leave, no final eval
            final = state.step >= run.total_steps or stopped is not None
            if state.step % cfg.eval_interval == 0 or (final and not interrupted):
                with explain_out_of_memory(run):
                    summary["eval"] = {**evaluate_and_track(run, record, display), "step": state.step}
                if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
                    summary["stopped"], final = "early_stopping", True
            text: str | None = None
            if (cfg.sample_interval and state.step % cfg.sample_interval == 0) or (final and not interrupted):
                text = summary["sample"] = sample(run)  # every rank: a collective under FSDP
            on_rank0(partial(log_step, run, record, text, trackers))
            if text is not None and not final:  # the last one closes the run's report instead
                display.print(f"--- sample at step {state.step}:\n{text}\n---")
            if state.step % cfg.save_interval == 0 or final:
                save_last(run)
            eta = (run.total_steps - state.step) * mean_step_s(state)
            if cfg.max_minutes:
                eta = max(0.0, min(eta, cfg.max_minutes * 60 - (now - start)))  # the cap may pass mid-step
            if train_loss is None:
                done = "no assistant token in the batch: nothing trained"
            else:
                done = f"loss {train_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s" + \
                    (f" | MFU {record['mfu']:.1%}" if peak else "")
            display.update(state.step, f"{done} | ETA {duration(eta)}")
            if final:
                break
    display.close()
    if summary["stopped"] == "max_steps" and (state.fitted_steps or cfg.max_steps) < cfg.max_steps:
        summary["stopped"] = "max_minutes"  # the schedule was fitted to the time, and ended with it
    return summary


def step_record(run: Run, train_loss: float | None, lr: float, tok_s: float, flops: float,
                peak: float | None) -> dict[str, Any]:
    """The step's line of metrics.jsonl. A step whose batch held no target (--loss-on assistant) trained nothing:
    its train_loss is null and `no_targets` says why, with no speed (a 0.0 read as a perfect step and pulled the
    plotted curve to 0; the tok/s of a step with no forward pass, as a huge speed). Readers skip its train_loss:
    `nanoqwen plot`, the trackers (they chart numbers only) and the progress line."""
    state, elapsed_s = run.state, round(run.state.elapsed_s, 3)
    record: dict[str, Any] = {"step": state.step, "train_loss": train_loss, "lr": lr, "tokens": state.tokens}
    if train_loss is None:
        return {**record, "no_targets": True, "elapsed_s": elapsed_s}
    record.update(tokens_per_s=round(tok_s, 1), elapsed_s=elapsed_s)
    if peak:
        record["mfu"] = round(tok_s / run.info.world_size * flops / peak, 4)
    return record


def agreed_stop(run: Run, time_up: bool, signal_name: str | None) -> str | None:
    """Why every process stops after this step ("max_minutes", "signal SIGTERM"), or None to go on. The wall
    cap is rank 0's clock and a signal may reach one rank only, so the ranks take the strongest reason any has."""
    level = all_reduce(float(time_up) + 2 * float(signal_name is not None), "max", run.info.device)  # 0, 1, 2-3
    if level >= 2:
        return f"signal {signal_name or 'to another process'}"
    return "max_minutes" if level else None


def open_trackers(run: Run, opened: ExitStack) -> list[Tracker]:
    """The trackers asked for (rank 0), each closed by `opened`. A new W&B run's id goes into the training
    state, so that a resume continues that W&B run. A tracker that fails to start stops every rank with rank 0's
    line (the others would crash in their next collective, with a traceback each)."""
    trackers: list[Tracker] = []

    def start() -> None:  # rank 0
        if run.cfg.tensorboard:
            trackers.append(opened.enter_context(TensorBoardLog(run.out, run.state.step)))
        if run.cfg.wandb:
            # config.json as written (start_fresh, record_resume): a resume's own run_config would hold its launch
            # and command alone, not the run's
            wandb = opened.enter_context(WandbLog(run.out, run.cfg.wandb_project, run.state.wandb_id,
                                                  read_run_config(run.out)))
            run.state.wandb_id = wandb.id
            trackers.append(wandb)

    on_rank0(start)
    return trackers


def log_step(run: Run, record: dict[str, Any], text: str | None, trackers: list[Tracker]) -> None:
    """What rank 0 writes of a step: its line of metrics.jsonl and its sample (if one was taken) in samples.txt,
    and the same to the trackers."""
    append_line(run.out / "metrics.jsonl", json_line(record) + "\n")
    for tracker in trackers:
        tracker.record(record)
    if text is not None:
        append_line(run.out / "samples.txt", f"--- step {run.state.step}\n{text}\n\n")
        for tracker in trackers:
            tracker.sample(run.state.step, text)


def activation_bytes_per_token(config: ModelConfig, checkpointing: bool, itemsize: int) -> int:
    """What an eager forward pass keeps for its backward, per token (counted with saved-tensor hooks): in each
    block about 6 vectors of the hidden size (norms' inputs and outputs, residuals), 4 of the q width and of the
    k/v width (before and after QK-norm and RoPE, attention's output) and 4 of the MLP's (gate, up, SiLU,
    product); with activation checkpointing, each block's input and one whole block at a time."""
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    block = 6 * config.hidden_size + 4 * (q_width + kv_width + config.intermediate_size)
    layers = config.num_hidden_layers
    kept = layers * config.hidden_size + block if checkpointing else layers * block
    return (kept + 2 * config.hidden_size) * itemsize


def micro_batch_in_memory(loader: BatchLoader, config: ModelConfig, per_param: int, *, given: bool,
                          checkpointing: bool, itemsize: int, processes: int, say: Callable[[str], None]) -> int:
    """The micro-batch to train with on CPU, where a process that runs out of memory is killed by the kernel
    with no message: the one asked for where its activations fit beside the model, else (a preset's, not
    given) the largest that divides this process's share and fits, said in a note; the batch, and so the
    samples of every step, stay the same. A --micro-batch given that does not fit, or no micro-batch at all,
    is one line. The estimate is a lower bound (what the backward keeps; a first step measured ~1.3x it with
    the passing buffers), so it alone decides a refusal, and a lowered micro-batch leaves it half again."""
    free = free_host_memory()
    if free is None:
        return loader.micro_batch
    # The least any process read: each reads at its own moment (one after the others built their models), and
    # every process must take the same micro-batch, as FSDP's forward passes (and evaluation's) are collectives.
    free = int(-all_reduce(-free, "max"))
    model_bytes = config.num_params() * per_param
    room = free // processes - model_bytes
    per_sequence = loader.seq_len * activation_bytes_per_token(config, checkpointing, itemsize)
    fits = [size for size in range(1, loader.micro_batch + 1)
            if loader.per_rank % size == 0 and size * per_sequence <= room]
    if fits and fits[-1] == loader.micro_batch:
        return loader.micro_batch
    each = f" in each of {processes} processes" if processes > 1 else ""
    need = (f"{loader.micro_batch} sequences of {loader.seq_len} tokens a forward pass need about "
            f"{loader.micro_batch * per_sequence / 2**30:.1f} GiB of activations beside the model's "
            f"{model_bytes / 2**30:.1f} GiB{each}, and this machine has {free / 2**30:.1f} GiB "
            "free")
    if not fits:
        lower = "shorten --seq-len" if checkpointing else "add --activation-checkpointing, shorten --seq-len"
        raise NanoQwenError(f"{need}; not even one sequence fits: {lower}, or choose a smaller model")
    roomy = max((size for size in fits if 3 * size * per_sequence <= 2 * room), default=fits[0])
    if given:
        raise NanoQwenError(f"--micro-batch {need}; --micro-batch {roomy} fits (--batch-size stays "
                            f"{loader.batch_size}, by gradient accumulation)")
    say(f"note: {need}: training with --micro-batch {roomy} (the same batch of {loader.batch_size} "
        "sequences a step, in more forward passes)")
    return roomy


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError a CPU allocation (or an older torch) fails with."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower() \
        or "can't allocate memory" in text


@contextmanager
def explain_out_of_memory(run: Run) -> Iterator[None]:
    """Running out of memory (the usual first failure of a bigger model) is one line saying what to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise NanoQwenError(
            f"out of {run.info.device.type} memory at step {run.state.step + 1} with {run.loader.micro_batch} "
            f"sequences of {run.seq_len} tokens per forward pass; lower --micro-batch (--batch-size stays the "
            "same, by gradient accumulation), add --activation-checkpointing, or shorten --seq-len") from None


def evaluate_and_track(run: Run, record: dict[str, Any], display: Display) -> dict[str, float]:
    """Evaluate, add the val_* fields to this step's record, keep best/ and the early-stopping count."""
    state = run.state
    result = evaluate(run)
    result["loss"] = all_reduce(result["loss"], "mean", run.info.device)  # so every rank decides alike
    record.update(val_loss=result["loss"], val_accuracy=result["accuracy"], val_perplexity=result["perplexity"],
                  val_bpb=result["bits_per_byte"])
    if not math.isfinite(result["loss"]):  # the last update diverged: keep such weights out of best/ and last/
        kept = f"; best/ holds step {state.best_step}" if state.best_val_loss is not None else ""
        raise NanoQwenError(f"the val loss became {result['loss']} at step {state.step} (the weights diverged); "
                            f"lower --lr or raise --warmup{kept}")
    improved = state.best_val_loss is None or result["loss"] < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_step, state.evals_since_best = result["loss"], state.step, 0
        save_best(run)
    elif state.step % run.cfg.eval_interval == 0:
        # Patience counts the evaluations of --eval-interval only: the extra one that ends a run cut short (by
        # --max-minutes) must not make a chain of such runs stop earlier than one run that never stopped. (One
        # that improves still resets it and writes best/: such a chain may then stop later, never earlier.)
        state.evals_since_best += 1
    display.print(f"step {state.step}: val loss {result['loss']:.4f} | accuracy {result['accuracy']:.3f} | "
                  f"bits per byte {result['bits_per_byte']:.3f}" + (" (best)" if improved else ""))
    return result


def fit_schedule(run: Run, step_s: float, recent_step_s: float, remaining_s: float, display: Display) -> None:
    """End the schedule where the time runs out, at `step_s` per step (5% spare, at most max_steps).

    Before WSD's decay starts, where the rate does not depend on the length, the length follows the mean
    step time (steady under bursty load); where it is so short that the decay would already have begun, the
    decay starts at once, compressed (ending at the time cap still at the peak rate would be worse). A first
    fit shorter than twice the warmup cuts the warmup to half of it, once (as a short --max-steps does), or
    the run would end still warming up, never decaying; a later, shorter fit cuts it again only where its decay
    would start inside the warmup (a machine that slowed during it ended the run there, short of the peak). In
    the decay the length only shrinks, by the slower of the mean and the last steps (`recent_step_s`, their
    median): a machine that slows down there compresses the rest of the decay (the rate drops to where the
    shorter schedule has it) so the run still ends at min_lr.
    """
    cfg, step, total = run.cfg, run.state.step, run.total_steps
    decaying = step >= wsd_decay_start(total, run.warmup)
    per_step = max(step_s, recent_step_s) if decaying else step_s
    fitted = min(cfg.max_steps, step + max(1, int(0.95 * remaining_s / per_step)))
    fitted = int(all_reduce(fitted, "max", run.info.device))  # one answer for all ranks
    if decaying:
        if fitted < total:
            if not run.decay_compressed:
                display.print(f"step {step}: the time left fits {fitted - step} of the decay's {total - step} "
                              f"remaining steps: it is compressed to end at step {fitted}")
                run.decay_compressed = True
            run.state.fitted_steps = display.total = fitted
        return
    first = run.state.fitted_steps is None
    if run.warmup > fitted // 2 and (first or run.warmup > wsd_decay_start(fitted, run.warmup)):
        display.print(f"warmup {run.warmup} is longer than half of the {counted(fitted, 'step')} that fit: "
                      f"{warming_up(fitted // 2)}")
        run.state.fitted_warmup = fitted // 2
    if first:
        fits = "all of --max-steps fit" if fitted == cfg.max_steps else counted(fitted, "step")
        display.print(f"fitting the schedule to --max-minutes {cfg.max_minutes:g}: {fits} at "
                      f"{step_s:.2f} s each (re-estimated until the decay starts)")
    run.state.fitted_steps = display.total = fitted
    if wsd_decay_start(fitted, run.warmup) < step:  # too little time left for a whole decay (a resume, a slow
        # machine): the rate drops to where the shorter schedule has it, so the run still ends at min_lr
        display.print(f"step {step}: the time left fits {counted(fitted - step, 'more step')}, fewer than a decay "
                      f"takes: the learning rate decays from here to the last step, {fitted}")
        run.decay_compressed = True
    if step + 1 == wsd_decay_start(fitted, run.warmup):
        # (the next step still runs at the peak rate: the metrics' step after it is the first decayed one)
        display.print(f"step {step}: the learning rate decays from step {step + 2} to the last step, {fitted}")


def fit_resumed_schedule(run: Run, display: Display) -> None:
    """Fit a resumed run's schedule to --max-minutes before its first step, at the mean time a step took before,
    where a new length given to the resume (--max-minutes, --max-steps) dropped the one fitted then. Until the
    loop has timed steps of its own, the schedule would span max_steps: a run that had decayed to min_lr went
    back to the peak rate for its first steps, however little time was left to decay again. The first step of
    each earlier invocation (compiling, warming up) is left out, as the loop leaves out its own."""
    cfg, state = run.cfg, run.state
    if cfg.fit_to_time and cfg.max_minutes and state.fitted_steps is None and state.step and state.elapsed_s > 0:
        step_s = mean_step_s(state)
        fit_schedule(run, step_s, step_s, cfg.max_minutes * 60, display)


def mean_step_s(state: LoopState) -> float:
    """The mean wall time of a step so far (evaluations and saves included), each invocation's first step left out:
    it compiles and warms up. Those alone where no other step was timed yet. `state.step` must be positive."""
    timed = state.step - state.first_steps
    return (state.elapsed_s - state.first_steps_s) / timed if timed > 0 else state.elapsed_s / state.step


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def launcher(run: Run) -> str:
    """How this run was started, for its resume line: a torchrun job resumes as one (a plain process would hold a
    model --fsdp shards whole), on one machine with its own process count, on several as the user started it."""
    if not run.info.distributed:
        return "nanoqwen"
    if run.info.processes_here != run.info.world_size:
        return "torchrun ... -m nanoqwen"  # several machines: their own --nnodes and rendezvous flags
    return f"torchrun --standalone --nproc_per_node {run.info.processes_here} -m nanoqwen"


def unsaved_flags(args: argparse.Namespace) -> str:
    """The flags given to this run that a resume does not take from it, for its resume line: pasted as printed it
    runs as this one did (a --device cpu run on a GPU machine would resume on the GPU, in bf16)."""
    given = [("--device", args.device if args.device != "auto" else None), ("--dtype", args.dtype)]
    return "".join(f" {flag} {quote(value)}" for flag, value in given if value) + (" --fsdp" if args.fsdp else "")


def abandoned_stop(run: Run, second: SecondSignal) -> Interrupted:
    """The line of a run whose stop a second signal cut short: what last/ holds (read from the disk: the save
    may have been abandoned, or done), and how to go on."""
    last, saved = run.out / "last", checkpoint_step(run.out / "last")
    abandoned = ", which abandoned the save the first signal asked for:"
    if saved is None:
        said = f"{abandoned} nothing is saved in {last} yet; start the run again"
    else:
        longer = f" --max-steps {saved * 2}" if saved >= run.total_steps else ""  # all its steps done (as report's)
        kept = f" as the run stopped: {last} holds step {saved}, its latest" if saved == run.state.step else \
            f"{abandoned} {last} holds step {saved}"
        said = f"{kept}; resume: {launcher(run)} train --resume {quote(str(run.out))}{unsaved_flags(run.args)}{longer}"
    return Interrupted(f"by a second {second}{said}", 128 + second.signum)


def plot_or_say_saved(run: Run) -> None:
    """Draw the run's loss.png; a Ctrl-C meanwhile (the run is saved by then) said so, with how to draw it later."""
    from nanoqwen.plot import plot_run

    try:
        plot_run(run.out)
    except KeyboardInterrupt:  # (train's StopSignal is over: a plain one)
        raise Interrupted(f"while drawing {run.out / 'loss.png'}: the run is saved ({run.out / 'last'} holds step "
                          f"{checkpoint_step(run.out / 'last')}); draw it later with `nanoqwen plot "
                          f"{quote(str(run.out))}`") from None


def report(run: Run, summary: dict[str, Any], wall_s: float) -> None:
    """The closing lines: how it went and where every file is."""
    state, out = run.state, run.out
    print(f"\nstopped after step {state.step} ({summary['stopped']}) in {duration(wall_s)}, "
          f"{state.tokens:,} tokens seen")
    if run.empty_steps:
        print(f"({counted(run.empty_steps, 'step')} drew no assistant token in the whole batch and trained nothing: "
              "give more conversations or a larger --batch-size)")
    if summary["stopped"] == "max_minutes" and state.step < run.cfg.max_steps / 2:  # a poor model may be why
        print(f"(the time allowed {state.step} of the {counted(run.cfg.max_steps, 'step')} planned; give more "
              "--max-minutes, or --resume it, for a better model)")
    if summary.get("eval"):
        e = summary["eval"]
        at = f" (at step {e['step']})" if e["step"] != state.step else ""  # a signal stops with no final evaluation
        print(f"val loss{at} {e['loss']:.4f} | accuracy {e['accuracy']:.3f} | perplexity "
              f"{readable(e['perplexity'], 2)} | bits per byte {e['bits_per_byte']:.3f} (best "
              f"{state.best_val_loss:.4f} at step {state.best_step})")
    if summary.get("sample") is not None:
        text = summary["sample"]
        if text == run.sample_prompt:  # the prompt alone (by default a new line) printed as blank lines: say so
            ended = "its reply" if run.loader.assistant is not None else "the document"  # --loss-on assistant
            text = " ".join(filter(None, [text.strip(), f"(nothing after it: the model ended {ended} at once)"]))
        print(f"\nsample:\n{for_stdout(text)}\n")  # its control characters shown on a terminal (an ESC cleared it)
    files = [("best checkpoint", out / "best"), ("last checkpoint + training state", out / "last"),
             ("metrics", out / "metrics.jsonl"), ("samples", out / "samples.txt"), ("loss curve", out / "loss.png"),
             ("TensorBoard events", out / TENSORBOARD_FOLDER),
             ("run config", out / "config.json"), ("data", run.data)]
    print("files:")
    for label, path in files:
        if path.exists():
            print(f"  {label:<34} {path}")
    if summary.get("wandb"):
        print(f"  {'W&B run':<34} {summary['wandb']}")
    model = out / "best" if (out / "best").exists() else out / "last"
    # All its steps done: more need a larger --max-steps. An early stop with steps left goes on as planned
    # once asked to (a plain resume of it is refused, as a run that never stopped would have ended there too).
    done = summary["stopped"] == "max_steps" or state.step >= run.total_steps  # a schedule fitted to time too
    longer = f" --max-minutes {run.cfg.max_minutes:g}" if done and run.fitted_short else \
        f" --max-steps {state.step * 2}" if done else \
        f" --max-steps {run.total_steps}" if summary["stopped"] == "early_stopping" else ""
    use = "chat --model {}" if run.chat_data else "sample --model {} --prompt 'Hello'"
    # paths quoted: pasted as printed, a path with spaces works
    print(f"next: nanoqwen {use.format(quote(str(model)))}  |  "
          f"{launcher(run)} train --resume {quote(str(out))}{unsaved_flags(run.args)}{longer}")
    if summary["stopped"].startswith("signal") and run.info.distributed:  # said where torchrun's traceback follows
        print("note: torchrun reports a job stopped by a signal with a traceback of its own below (SignalException, "
              "or ChildFailedError where only a worker got it): this run stopped as asked, with last/ saved at step "
              f"{state.step}", file=sys.stderr, flush=True)


@contextmanager
def tf32_on_gpu() -> Iterator[None]:
    """TF32 for the fp32 matmuls and convolutions left on a GPU while a run trains, and the process's own settings
    back after it, an error's too: a notebook that compares with Transformers on the GPU afterwards gets fp32's."""
    # torch raises where one process mixes the allow_tf32 flags with torch >= 2.9's fp32_precision (when a flag is
    # read after the other API set it): keep to the one the process uses. The flags are what Transformers, older
    # Inductors and most code set and read; a flag that cannot be read says the process set fp32_precision.
    try:
        switches = [(torch.backends.cuda.matmul, "allow_tf32", True), (torch.backends.cudnn, "allow_tf32", True)]
        saved = [getattr(backend, name) for backend, name, _ in switches]
    except RuntimeError:
        switches = [(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
                    (torch.backends.cudnn.conv, "fp32_precision", "tf32")]
        saved = [getattr(backend, name) for backend, name, _ in switches]
    for backend, name, on in switches:
        setattr(backend, name, on)
    try:
        yield
    finally:
        for (backend, name, _), value in zip(switches, saved, strict=True):
            setattr(backend, name, value)


def run(args: argparse.Namespace) -> int:
    stdout, sys.stdout = sys.stdout, ReaderMayLeave(sys.stdout)  # type: ignore[assignment]
    try:
        with tf32_on_gpu():
            stopped = train_and_report(args)
    except Exception as e:
        line = job_error_line(e)  # another process's end too: one line, not a traceback each
        if line is None or not torch.distributed.is_initialized():  # a bug's traceback; one line from the command line
            raise
        from nanoqwen.cli import say

        say_once(f"nanoqwen {args.command}: error: {line}", say)  # not once a process: one error of the user's
        return 2
    finally:
        sys.stdout = stdout
        # Free the model (and with it DDP's or FSDP's hold on the process group) while the interpreter is whole,
        # then the group: a group last freed during interpreter shutdown could abort the process as it exits
        # (seen with gloo: "terminate called without an active exception" after a finished FSDP run).
        gc.collect()
        shutdown_distributed()
    if stopped.startswith("signal "):  # saved, but not done: `train ... && next-step` must not go on
        return 128 + getattr(signal.Signals, stopped.split()[1], signal.SIGTERM).value  # 130 Ctrl-C, 143 SIGTERM
    return 0


def train_and_report(args: argparse.Namespace) -> str:
    """Train and print the closing report; returns why the run stopped (summary["stopped"])."""
    started = time.perf_counter()
    this_run = setup(args)
    if this_run.info.is_main:
        cfg, m = this_run.cfg, this_run.model
        origin = f" from {args.init_from}" if args.init_from else \
            f" from step {this_run.state.step}" if args.resume is not None else ""
        parallel = " FSDP" if args.fsdp else " DDP" if this_run.info.distributed else ""  # torchrun: how it splits
        threads = "" if this_run.info.device.type != "cpu" else \
            f", {counted(torch.get_num_threads(), 'thread')}{' each' if this_run.info.world_size > 1 else ''}"
        print(f"{'resuming' if args.resume is not None else 'training'} {this_run.preset}{origin}: "
              f"{m.num_params() / 1e6:.3g}M parameters, vocab {m.config.vocab_size}, on {this_run.info.device} "
              f"x{this_run.info.world_size}{parallel} ({str(this_run.amp_dtype).removeprefix('torch.')}{threads}), "
              f"{counted(this_run.total_steps, 'step')} of {cfg.batch_size} x {cfg.seq_len} tokens "
              f"(micro-batch {this_run.loader.micro_batch}, accumulation {this_run.loader.accumulation}), "
              f"{cfg.optimizer}, lr {cfg.lr:g}, data {this_run.data}, out {this_run.out}", flush=True)
    try:
        summary = train(this_run)
        if this_run.info.is_main:
            plot_or_say_saved(this_run)
            report(this_run, summary, time.perf_counter() - started)
    except SecondSignal as e:
        raise abandoned_stop(this_run, e) from None
    finally:
        if this_run.lock is not None:
            release_lock(this_run.lock)
    return str(summary["stopped"])

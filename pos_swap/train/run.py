"""A recovery run: patch a model, fine-tune it with LoRA through transformers' Trainer, and measure perplexity
before the swap, after it and after recovery, at the training length and multiples of it.

    settings = Settings(scheme="alibi", seq_len=256, max_steps=200)
    run = finetune(model, tokens, settings, out="runs/alibi")     # results.json, PNG plots, report.html
    model = pos_swap.from_pretrained("runs/alibi/merged")         # the recovered model, patch re-applied

The run folder holds ``checkpoints/`` (Trainer's, for ``resume=True``: same step, optimizer state and data
order), ``adapter/`` (the LoRA adapter with ``pos_swap.json``: the patch record and the base model) and
``merged/`` (a full model). Under ``accelerate launch`` every process trains; the first one measures and writes.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from accelerate.utils import str_to_bool
from tqdm.auto import tqdm

from .. import archs, engine, loading, report
from ..errors import PosSwapError
from ..evaluate.ppl import summarize
from ..evaluate import perplexity
from ..evaluate.specs import format_length, label
from ..registry import get_scheme
from .data import PackedSequences, split
from .lora import check_trainable, extra_modules, trainable

STAGES = ("before", "swapped", "recovered")
NATIVE = "native"  # the control: the same training with no swap, which shows what the text alone teaches
ADAPTER_RECORD = "pos_swap.json"


@dataclasses.dataclass
class Settings:
    """Everything that shapes a recovery run. A resumed run must match them, except those that do not change what
    was trained: ``max_steps`` (train further), ``save_steps`` and the evaluation lengths, as long as the held-out
    tail (the longest length x ``eval_windows``) stays the same."""

    scheme: str
    params: dict = dataclasses.field(default_factory=dict)
    seq_len: int = 512
    max_steps: int = 100
    target_len: int | None = None  # also evaluated; with pose, the positions training covers
    pose: bool = False
    pose_chunks: int = 2
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 2e-4
    save_steps: int | None = None  # default: max_steps
    lora_rank: int = 8  # 0: no LoRA, train only the extra modules
    lora_alpha: float = 16.0
    train_embeddings: bool = False
    train_norms: bool = False
    train_scheme: bool | None = None  # None: train the scheme's parameters when it has any
    eval_factors: tuple[int, ...] = (1, 2, 4)
    eval_windows: int = 1  # held-out tokens: this many windows of the longest length; every length scores them all
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 (or fp16) on a GPU, float32 on a CPU
    seed: int = 0

    def __post_init__(self):
        if self.scheme != NATIVE:
            get_scheme(self.scheme)  # an unknown name fails first, with "did you mean"
        elif self.params:
            raise PosSwapError(f"'native' (training with no swap) takes no parameters; got {sorted(self.params)}.")
        self.eval_factors = tuple(self.eval_factors)
        at_least = {"seq_len": 1, "max_steps": 1, "batch_size": 1, "grad_accum": 1, "eval_windows": 1, "pose_chunks": 1,
                    "lora_rank": 0, "save_steps": 1}  # fmt: skip
        for name, least in at_least.items():
            value = getattr(self, name)
            if value is None and name == "save_steps":
                continue  # default: max_steps
            if not (_is_whole(value) and value >= least):
                raise PosSwapError(f"--{name.replace('_', '-')} must be a whole number of at least {least}; got {value!r}.")
        if not self.eval_factors or not all(_is_whole(f) and f >= 1 for f in self.eval_factors):
            raise PosSwapError(
                f"--eval-factors must be whole multiples of --seq-len, at least 1 (e.g. 1,2,4); got {self.eval_factors}."
            )
        for name in ("learning_rate", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise PosSwapError(f"--{name.replace('_', '-')} must be a finite number above 0; got {value!r}.")
        if self.pose and self.target_len is None:
            raise PosSwapError("--pose stretches the training window to a target length: give --target-len N.")
        if self.target_len is not None and self.target_len < self.seq_len:
            raise PosSwapError(
                f"--target-len ({self.target_len}) is below --seq-len ({self.seq_len}); give a target length of at "
                f"least the training length."
            )
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise PosSwapError(f"Unknown precision '{self.precision}'; use auto, fp32, bf16 or fp16.")

    @property
    def swaps(self) -> bool:
        """Whether the run swaps a scheme in (False: the native control)."""
        return self.scheme != NATIVE

    @property
    def lengths(self) -> list[int]:
        """The evaluation lengths: multiples of the training length, and the target length."""
        return sorted({self.seq_len * f for f in self.eval_factors} | ({self.target_len} if self.target_len else set()))


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finetune(model, tokens: torch.Tensor, settings: Settings, *, out=None, model_name: str = "", text_label: str = "",
             resume: bool = False, overwrite: bool = False, progress: bool = True, callbacks=(),
             tokenizer=None) -> report.RunFolder:  # fmt: skip
    """Recover ``model`` (unpatched) under ``settings.scheme`` on ``tokens (N,)``: the model is patched, wrapped and
    trained in place (``native``: trained unpatched, the control). Returns the run (its cells). With ``out``, writes
    the run folder described in the module docstring; ``tokenizer`` is saved beside the merged model. Every setting
    is checked before anything is written."""
    check_launch()
    state = process_state()
    if engine.describe(model) is not None:
        raise PosSwapError("finetune patches the model itself: give it the unpatched model (pos_swap.unpatch(model)).")
    train, held_out = split(tokens, settings.seq_len, max(settings.lengths) * settings.eval_windows)
    swap = engine.patched(model, settings.scheme, **settings.params) if settings.swaps else contextlib.nullcontext()
    with swap:  # a patch's parameters exist only on the patched model
        extras = extra_modules(model, embeddings=settings.train_embeddings, norms=settings.train_norms,
                               scheme=settings.train_scheme)  # fmt: skip
    check_trainable(model, settings.lora_rank, extras)
    meta = {"model": model_name or model.config._name_or_path, "text": text_label, "text_tokens": tokens.numel(),
            "held_out_tokens": held_out.numel(), "trained_context": archs.trained_context(model.config),
            **dataclasses.asdict(settings)}  # fmt: skip
    checkpoint = None
    if out is not None:
        report.check_output(out, resume=resume, overwrite=overwrite)  # every process, before any writes
        checkpoint = _last_checkpoint(out) if resume else None
        _check_steps(checkpoint, settings.max_steps)
    state.wait_for_everyone()
    run = report.RunFolder(out if state.is_main_process else None, kind="finetune", meta=meta, resume=resume,
                           overwrite=overwrite, may_change=_may_change(settings))  # fmt: skip
    if overwrite and run.path is not None:
        for stale in ("checkpoints", "adapter", "merged"):
            shutil.rmtree(run.path / stale, ignore_errors=True)
    run.cells = [c for c in run.cells if "stage" not in c or c["length"] in settings.lengths]  # lengths dropped on resume

    measure(run, model, held_out, settings, "before", progress=progress)
    if settings.swaps:
        engine.patch(model, settings.scheme, **settings.params)
        measure(run, model, held_out, settings, "swapped", progress=progress)
    transformers.set_seed(settings.seed)  # the adapter's initial weights
    wrapped = trainable(model, settings.lora_rank, settings.lora_alpha, embeddings=settings.train_embeddings,
                        norms=settings.train_norms, scheme=settings.train_scheme)  # fmt: skip
    trainer = _trainer(wrapped, PackedSequences(train, settings.target_len if settings.pose else None,
                                                settings.pose_chunks, settings.seed), settings, out, progress, callbacks)  # fmt: skip
    started = time.perf_counter()
    _train(trainer, checkpoint)
    seconds = time.perf_counter() - started
    if state.is_main_process:
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        run.add({"key": "training", "steps": trainer.state.global_step, "losses": losses, "seconds": seconds,
                 "sequences": len(train), "processes": state.num_processes})  # fmt: skip
        merged = save(wrapped, run.path, meta["model"], tokenizer) if run.path is not None else _merge(wrapped)
        measure(run, merged, held_out, settings, "recovered", redo=True, progress=progress)
        if run.path is not None:
            write_report(run)
    state.wait_for_everyone()
    return run


def _may_change(settings: Settings) -> tuple[str, ...]:
    """Settings a resumed run may change: none changes what was trained or the held-out tail (recorded as
    ``held_out_tokens``, which must match): the step count, the checkpoint interval, the evaluation lengths, and
    ``target_len`` unless PoSE trains towards it."""
    return ("max_steps", "save_steps", "eval_factors", "eval_windows") + (() if settings.pose else ("target_len",))


def _check_steps(checkpoint: str | None, max_steps: int) -> None:
    """Refuse a ``max_steps`` below the steps the checkpoint to resume from has already trained."""
    if checkpoint is None:
        return
    trained = transformers.TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json")).global_step
    if max_steps < trained:
        raise PosSwapError(
            f"The run has trained {trained} steps already; --max-steps {max_steps} cannot undo them. Give --max-steps "
            f"{trained} or more to continue it, or --overwrite to start again."
        )


def check_launch() -> None:
    """Refuse, before anything loads, an ``accelerate launch`` with FSDP version 1 set up in a way that cannot train
    here: every run freezes most weights (LoRA), which FSDP 1 mixes with trained ones only with
    ``fsdp_use_orig_params``; and its ``sync_module_states`` (also forced by ``fsdp_cpu_ram_efficient_loading``)
    cannot start on CPU processes. FSDP version 2 needs neither (examples/accelerate/fsdp.yaml)."""
    if not _env_flag("ACCELERATE_USE_FSDP") or os.environ.get("FSDP_VERSION", "1") != "1":
        return
    fix = "or use FSDP version 2 (fsdp_version: 2, as examples/accelerate/fsdp.yaml does)"
    if not _env_flag("FSDP_USE_ORIG_PARAMS"):
        raise PosSwapError(
            "This FSDP version 1 launch flattens each wrapped module's weights into one parameter, which cannot mix "
            f"the frozen and trained weights of a LoRA recovery: set fsdp_use_orig_params: true in the config, {fix}."
        )
    syncs = _env_flag("FSDP_SYNC_MODULE_STATES") or _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING")
    if syncs and not torch.cuda.is_available():
        raise PosSwapError(
            "FSDP version 1 with fsdp_sync_module_states (or fsdp_cpu_ram_efficient_loading) cannot start on CPU "
            f"processes: set both to false, {fix}."
        )


def _env_flag(name: str) -> bool:
    return bool(str_to_bool(os.environ.get(name, "false")))


def process_state() -> PartialState:
    """This process's place in an ``accelerate launch`` run. On a CPU it must be built with ``cpu=True`` (as the
    Trainer's own accelerator is), or several processes each run alone instead of as one gloo group."""
    return PartialState(cpu=not torch.cuda.is_available())


def finetune_from(model_name: str, text, settings: Settings, *, out=None, resume=False, overwrite=False,
                  progress: bool = True) -> report.RunFolder:  # fmt: skip
    """:func:`finetune` on a checkpoint (Hub name, folder, offline alias) and a text (file, folder, dataset, None:
    pydoc topics): what ``pos-swap finetune`` runs. The output folder is checked before anything loads."""
    from ..loading import load, tokenize
    from .data import read_source

    check_launch()
    if out is not None:
        report.check_output(out, resume=resume, overwrite=overwrite)
    content, label = read_source(text)
    device = str(process_state().device)
    longest = max(settings.lengths) if device == "cpu" else None
    check = engine.scheme_check(settings.scheme if settings.swaps else None, settings.params)
    model, tokenizer = load(model_name, device=device, dtype="float32", longest=longest, check=check)
    tokens = tokenize(tokenizer, content, label)
    return finetune(model, tokens, settings, out=out, model_name=model_name, text_label=label, resume=resume,
                    overwrite=overwrite, progress=progress, tokenizer=tokenizer)  # fmt: skip


def measure(run: report.RunFolder, model, held_out: torch.Tensor, settings: Settings, stage: str, redo=False,
            progress: bool = True) -> None:  # fmt: skip
    """Perplexity of ``model`` at every evaluation length on the whole held-out tail, one cell per (stage, length);
    the main process only. Lengths a learned table cannot reach (the native model's) are recorded as None."""
    if not process_state().is_main_process:
        return
    model.eval()
    native_table = engine.describe(model) is None and archs.lookup(model).family == archs.LEARNED
    reach = archs.position_table(model).num_embeddings - archs.lookup(model).table_offset if native_table else None
    todo = [length for length in settings.lengths if redo or not run.done(f"{stage}|{length}")]
    for length in tqdm(todo, desc=f"perplexity {stage}", unit="length", disable=not progress or not todo):
        key = f"{stage}|{length}"
        cell = {"key": key, "stage": stage, "length": length, "ppl": None}
        if reach is None or length <= reach:
            cell.update(pooled_perplexity(model, held_out, length))
        run.add(cell)


def pooled_perplexity(model, held_out: torch.Tensor, length: int) -> dict:
    """Perplexity over every whole ``length``-token window of ``held_out``: each length scores the same tokens, so
    lengths compare. The windows are equally long, so the pooled value is the geometric mean of theirs; the
    spread (``ppl_std``) is over windows."""
    rows = perplexity(model, held_out, [length], windows_per_length=held_out.numel() // length, progress=False)
    logs = torch.tensor([math.log(row["ppl"]) for row in rows], dtype=torch.float64)
    return {"ppl": math.exp(logs.mean()), "ppl_std": summarize(rows, keys=("ppl",))["ppl_std"], "windows": len(rows)}


def _precision(settings: Settings) -> dict:
    if settings.precision == "fp32" or not torch.cuda.is_available():
        if settings.precision in ("bf16", "fp16"):
            raise PosSwapError(f"--precision {settings.precision} needs a GPU; on a CPU use fp32 (or auto).")
        return {}
    if settings.precision == "auto":
        return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
    return {settings.precision: True}


def _trainer(model, dataset, settings: Settings, out, progress: bool, callbacks) -> transformers.Trainer:
    if out:
        saving = {"output_dir": str(Path(out) / "checkpoints"), "save_strategy": "steps",
                  "save_steps": settings.save_steps or settings.max_steps}  # fmt: skip
    else:  # nothing is saved, but Trainer wants a folder: a fresh temporary one rather than the working directory
        saving = {"output_dir": tempfile.mkdtemp(prefix="pos_swap_finetune_"), "save_strategy": "no"}
    args = transformers.TrainingArguments(
        max_steps=settings.max_steps, per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(10, settings.max_steps // 10), logging_steps=1, report_to="none", seed=settings.seed,
        data_seed=settings.seed, disable_tqdm=not progress, activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), **saving, **_precision(settings),
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                data_collator=transformers.default_data_collator, callbacks=list(callbacks))  # fmt: skip


def _train(trainer: transformers.Trainer, checkpoint: str | None) -> None:
    """Train to ``max_steps``, from ``checkpoint`` when given (same step, optimizer state and data order). A
    checkpoint that reached ``max_steps`` (a finished run resumed) is only loaded: Trainer would take one more step."""
    saved = transformers.TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json")) if checkpoint else None
    if saved is not None and saved.global_step >= trainer.args.max_steps:
        _load_weights(trainer.model, Path(checkpoint))
        trainer.state = saved
    else:
        trainer.train(resume_from_checkpoint=checkpoint)


def _load_weights(model, checkpoint: Path) -> None:
    """The trained weights of a Trainer checkpoint, into ``model``: the adapter through peft's ``load_adapter``, a
    model trained without LoRA from its (possibly sharded) safetensors. Weights that ``save_pretrained`` leaves out
    because they are tied stay tied, as when Trainer loads them itself."""
    if hasattr(model, "peft_config"):
        model.load_adapter(str(checkpoint), "default", is_trainable=True)
    elif (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
    else:
        transformers.trainer_utils.load_sharded_checkpoint(model, str(checkpoint), strict=False)


def _last_checkpoint(out) -> str | None:
    folder = Path(out or ".") / "checkpoints"
    return transformers.trainer_utils.get_last_checkpoint(str(folder)) if out and folder.is_dir() else None


def _merge(wrapped):
    """The patched transformers model with the adapter folded into its weights."""
    return wrapped.merge_and_unload() if hasattr(wrapped, "merge_and_unload") else wrapped


def save(wrapped, path: Path, base_model: str, tokenizer=None):
    """Save the adapter with the patch record (``adapter/``) and the merged full model (``merged/``, which
    ``pos_swap.from_pretrained`` loads with its patch re-applied); returns the merged model."""
    if hasattr(wrapped, "peft_config"):
        wrapped.save_pretrained(path / "adapter")
        record = {"base_model": base_model, "patch": engine.describe(wrapped)}
        (path / "adapter" / ADAPTER_RECORD).write_text(json.dumps(record, indent=1))
    merged = _merge(wrapped)
    merged.save_pretrained(path / "merged")
    if tokenizer is not None:
        tokenizer.save_pretrained(path / "merged")
    return merged


def load_adapter(adapter_dir, base_model=None, **kwargs):
    """A recovered model from its ``adapter/`` folder: the base model (default: the one recorded, a Hub name, folder
    or ``offline:`` alias), patched as recorded, with the adapter on top. ``kwargs`` go to ``from_pretrained``."""
    import peft

    record_file = Path(adapter_dir) / ADAPTER_RECORD
    if not record_file.is_file():
        raise PosSwapError(f"'{adapter_dir}' is not a pos_swap adapter folder (no {ADAPTER_RECORD}); give a run's adapter/.")
    record = json.loads(record_file.read_text())
    if base_model is None or isinstance(base_model, (str, Path)):
        name = base_model or record.get("base_model")
        if not name:
            raise PosSwapError(f"'{adapter_dir}' does not name its base model; pass base_model=MODEL_OR_DIR.")
        base_model = engine.from_pretrained(loading.model_path(name), **kwargs)  # offline: aliases too
    if record["patch"] is not None:  # None: a native control run
        engine.reapply(base_model, record["patch"])
    return peft.PeftModel.from_pretrained(base_model, adapter_dir).eval()


# -- the report ---------------------------------------------------------------------------------------------------
def table(cells: list[dict]) -> tuple[list[dict], list[str]]:
    """Perplexity per stage (rows) and length (columns)."""
    lengths = sorted({c["length"] for c in cells if "stage" in c})
    columns = ["stage"] + [format_length(n) for n in lengths]
    rows = []
    for stage in STAGES:
        by_length = {c["length"]: c["ppl"] for c in cells if c.get("stage") == stage}
        if by_length:
            rows.append({"stage": stage, **{format_length(n): by_length.get(n) for n in lengths}})
    return rows, columns


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each ``window`` consecutive values (``len(values) - window + 1`` of them)."""
    sums = torch.tensor([0.0, *values], dtype=torch.float64).cumsum(0)
    return ((sums[window:] - sums[:-window]) / window).tolist()


def write_report(run: report.RunFolder) -> list[report.Section]:
    """``perplexity.png``, ``loss.png`` and ``report.html`` in the run folder; returns the sections."""
    series = {}
    for stage in STAGES:
        points = sorted((c["length"], c["ppl"]) for c in run.cells if c.get("stage") == stage and c["ppl"] is not None)
        if points:
            series[stage] = tuple(zip(*points))
    lengths = sorted({c["length"] for c in run.cells if "stage" in c})
    seq_len = run.meta["seq_len"]
    scheme = label(run.meta["scheme"], run.meta.get("params", {}))
    title = f"{scheme} recovery" if run.meta["scheme"] != NATIVE else "native fine-tuning (no swap)"
    marks = {"training length": seq_len}
    if run.meta.get("pose"):  # PoSE trains positions up to the target inside seq_len windows
        marks["PoSE target (positions trained)"] = run.meta["target_len"]
    report.line_plot(run.path / "perplexity.png", series, xlabel="tokens", ylabel="perplexity", logx=True, logy=True,
                     title=title, marks=marks,
                     xticks={n: format_length(n) for n in lengths})  # fmt: skip
    training = next((c for c in run.cells if c.get("key") == "training"), {"losses": []})
    losses = training["losses"]
    steps = list(range(1, len(losses) + 1))
    curves = {"training loss": (steps, losses)}
    window = len(losses) // 20
    if window > 1:  # batch-1 losses are noisy: a running mean shows the trend
        curves[f"mean of the last {window} steps"] = (steps[window - 1 :], running_mean(losses, window))
    report.line_plot(run.path / "loss.png", curves, xlabel="step", ylabel="loss")
    sections = [
        report.Section("Perplexity before the swap, after it, and after recovery", table=table(run.cells),
                       images=["perplexity.png"]),
        report.Section("Training", text=f"{training.get('steps', 0)} steps in {training.get('seconds', 0):.1f} s",
                       images=["loss.png"]),
    ]  # fmt: skip
    report.write_html(run.path / "report.html", f"pos_swap {title}", sections, run.meta)
    return sections

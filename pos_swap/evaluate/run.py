"""Evaluation runs: schemes x tasks x lengths on one model, written cell by cell to a run folder and summarized as
terminal tables, PNG plots and ``report.html``. ``pos-swap eval``, ``recommend`` and ``demo`` call these."""

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import archs, engine, offline, report
from ..errors import PosSwapError
from .ppl import bucket_losses, bucket_size, check_fits, forwards, summarize, token_losses, window_perplexity, windows
from .retrieval import DEPTHS, needle_for, retrieval_cells, sweep, trial_row, wilson_interval
from .specs import SchemeSpec, format_length

TASKS = ("ppl", "passkey", "multikey")


@dataclasses.dataclass
class Plan:
    """What an evaluation measures. ``retrieval_lengths`` default to ``lengths``. ``shared``: a causal-consistent
    scheme reads every perplexity window from one forward per window start and runs each retrieval task through
    one cache (other schemes fall back to a forward or prefill per cell, and the report says so)."""

    schemes: list[SchemeSpec]
    lengths: list[int]
    tasks: tuple[str, ...] = ("ppl",)
    retrieval_lengths: list[int] | None = None
    depths: tuple[float, ...] = DEPTHS
    trials: int = 1
    windows: int = 1
    seed: int = 0
    keys: int = 4  # needles in a multikey haystack
    shared: bool = True

    def __post_init__(self):
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown or not self.tasks:
            raise PosSwapError(f"Unknown task(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)}.")
        for name, value in (("trials", self.trials), ("windows", self.windows)):
            if value < 1:
                raise PosSwapError(f"--{name} must be at least 1; got {value}.")
        self.retrieval_lengths = self.retrieval_lengths or self.lengths

    def cells(self):
        """Every cell as ``(scheme, task, length, index)``; index = window for ppl, (depth, trial) for retrieval."""
        for spec in self.schemes:
            for task in self.tasks:
                if task == "ppl":
                    yield from ((spec, task, length, w) for length in self.lengths for w in range(self.windows))
                else:
                    yield from ((spec, task, length, (d, t)) for length in self.retrieval_lengths
                                for d in self.depths for t in range(self.trials))  # fmt: skip

    def longest(self) -> int:
        return max(self.lengths + (self.retrieval_lengths if set(self.tasks) - {"ppl"} else []))


def cell_key(spec: SchemeSpec, task: str, length: int, index) -> str:
    where = f"w{index}" if task == "ppl" else f"d{index[0]:g}/t{index[1]}"
    return f"{spec.label}|{task}|{length}|{where}"


# -- loading ------------------------------------------------------------------------------------------------------
def load(name_or_path: str, *, device: str = "cpu", dtype: str = "float32", longest: int | None = None):
    """Model and tokenizer from a Hub name, a folder (a saved patch is re-applied) or an offline alias. The memory
    a ``longest``-token forward needs is checked before the weights are loaded."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        path = offline.resolve(name_or_path)
    except offline.OfflineCheckpointMissing as error:
        raise PosSwapError(str(error)) from None
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise PosSwapError(f"Cannot read a model config from '{name_or_path}': give a model folder, a Hub name "
                           f"(online), or offline:smollm2. ({str(error).splitlines()[0]})") from None  # fmt: skip
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise PosSwapError(f"Unknown dtype '{dtype}'; use float32, bfloat16 or float16.")
    if longest and device == "cpu":
        check_fits(config, longest, torch_dtype.itemsize)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        raise PosSwapError(
            f"'{name_or_path}' has no tokenizer. Save one into the folder (tokenizer.save_pretrained(DIR)); "
            f"`pos-swap patch` copies it for you."
        ) from None
    model = engine.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    return model, tokenizer


def text_tokens(tokenizer, text: str | Path | None = None) -> tuple[torch.Tensor, str]:
    """Token ids ``(N,)`` of a text file (default: Python's pydoc topics) and a label naming the text."""
    if text is None:
        content, label = offline.pydoc_text(), "pydoc_data.topics"
    else:
        path = Path(text)
        if not path.is_file():
            raise PosSwapError(f"Text file '{text}' does not exist; give a UTF-8 text file with --text FILE.")
        content, label = path.read_text(encoding="utf-8", errors="replace"), str(path)
    return tokenize(tokenizer, content, label), label


def tokenize(tokenizer, content: str, label: str) -> torch.Tensor:
    """Token ids ``(N,)`` of a whole text (no length limit); ``label`` names the text in the error when it is empty."""
    if not content.strip():
        raise PosSwapError(f"The text '{label}' is empty; give a text with at least as many tokens as the longest length.")
    limit, tokenizer.model_max_length = tokenizer.model_max_length, int(1e30)  # no "sequence too long" warning
    try:
        return tokenizer(content, return_tensors="pt").input_ids[0]
    finally:
        tokenizer.model_max_length = limit


# -- the run ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def applied(model, spec: SchemeSpec):
    """The model under ``spec`` inside the block; yields what :func:`pos_swap.describe` says then (None: native)."""
    if spec.name is None:
        yield engine.describe(model)
        return
    with engine.patched(model, spec.name, **spec.params):
        yield engine.describe(model)


def _check_plan(plan: Plan, tokenizer, tokens: torch.Tensor) -> None:
    """Fail before any compute: windows the text cannot fill, bad depths, retrieval lengths too short for their
    prompt."""
    need = max(plan.lengths) * plan.windows
    if "ppl" in plan.tasks and tokens.numel() < need:
        raise PosSwapError(
            f"The text holds {tokens.numel()} tokens, fewer than the {need} that {plan.windows} window(s) of the "
            f"longest length {max(plan.lengths)} need. Pass a longer text (--text FILE), shorter --lengths or "
            f"fewer --windows."
        )
    for task in set(plan.tasks) - {"ppl"}:
        retrieval_cells(task, plan.retrieval_lengths, plan.depths, plan.trials)
        needle_for(tokenizer, task, min(plan.retrieval_lengths), 0.5, 0, plan.seed,
                   **({"keys": plan.keys} if task == "multikey" else {}))  # fmt: skip


def evaluate(model, tokenizer, plan: Plan, *, out=None, model_name: str = "", text=None, resume: bool = False,
             overwrite: bool = False, progress: bool = True) -> report.RunFolder:  # fmt: skip
    """Measure every cell of ``plan`` on ``model`` and return the run (its ``cells``; with ``out``, a folder whose
    results.json is rewritten after every cell, so ``resume=True`` skips what an interrupted run finished)."""
    tokens, text_label = text_tokens(tokenizer, text)
    _check_plan(plan, tokenizer, tokens)
    meta = {"model": model_name or getattr(model.config, "_name_or_path", ""), "text": text_label,
            "text_tokens": tokens.numel(), "trained_context": archs.trained_context(model.config),
            "bucket": bucket_size(max(plan.lengths)),
            **{k: v for k, v in dataclasses.asdict(plan).items() if k != "schemes"},
            "schemes": [spec.label for spec in plan.schemes]}  # fmt: skip
    run = report.RunFolder(out, kind="eval", meta=meta, resume=resume, overwrite=overwrite)
    todo = [cell for cell in plan.cells() if not run.done(cell_key(*cell))]
    bar = tqdm(total=len(todo), desc="evaluation", disable=not progress)
    for spec in plan.schemes:
        mine = [cell for cell in todo if cell[0] is spec]
        if not mine:
            continue
        with applied(model, spec) as described:
            consistent = engine.causal_consistent(model)
            common = {"scheme": spec.label, "patch": described, "model": meta["model"], "text": text_label,
                      "seed": plan.seed, "causal_consistent": consistent, "shared": plan.shared and consistent}  # fmt: skip
            for task in plan.tasks:
                bar.set_postfix_str(f"{spec.label} {task}")
                cells = [(length, index) for _, kind, length, index in mine if kind == task]
                measured = _perplexities if task == "ppl" else _retrievals
                for length, index, result in measured(model, tokenizer, tokens, plan, task, cells, common["shared"]):
                    run.add({"key": cell_key(spec, task, length, index), "task": task, "length": length, **common,
                             **result})  # fmt: skip
                    bar.update(1)
    bar.close()
    return run


def _perplexities(model, tokenizer, tokens, plan: Plan, task: str, cells, shared: bool):
    """``(length, window, result)`` of each perplexity cell, windows sharing a start read from one forward when
    ``shared``; each result carries its position buckets and the length of the forward it was read from."""
    bucket = bucket_size(max(plan.lengths))
    for start, longest, group in forwards(cells, shared):
        losses = token_losses(model, tokens[start : start + longest][None])
        for length, index in group:
            mine = losses[: length - 1]
            yield length, index, {"window": index, "forward": longest, **window_perplexity(mine),
                                  "buckets": bucket_losses(mine, bucket)}  # fmt: skip


def _retrievals(model, tokenizer, tokens, plan: Plan, task: str, cells, shared: bool):
    """``(length, (depth, trial), result)`` of each retrieval cell, through one cache when ``shared``."""
    extra = {"keys": plan.keys} if task == "multikey" else {}
    cells = [(length, depth, trial) for length, (depth, trial) in cells]
    needles = [needle_for(tokenizer, task, *cell, plan.seed, **extra) for cell in cells]
    for index, result in sweep(model, tokenizer, needles, reuse=shared, progress=False):
        length, depth, trial = cells[index]
        yield length, (depth, trial), trial_row(task, length, depth, trial, plan.seed, needles[index], result)


# -- summaries, plots and the report ------------------------------------------------------------------------------
def perplexity_table(cells: list[dict]) -> list[dict]:
    """One row per (scheme, length): mean and spread over windows of whole-window and last-quarter perplexity."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        if cell["task"] == "ppl":
            groups.setdefault((cell["scheme"], cell["length"]), []).append(cell)
    return [{"scheme": scheme, "length": length, **summarize(group)} for (scheme, length), group in groups.items()]


def accuracy_table(cells: list[dict], task: str) -> list[dict]:
    """One row per (scheme, length, depth): retrieval accuracy over trials."""
    groups: dict[tuple, list[bool]] = {}
    for cell in cells:
        if cell["task"] == task:
            groups.setdefault((cell["scheme"], cell["length"], cell["depth"]), []).append(cell["correct"])
    return [{"scheme": s, "length": n, "depth": d, "accuracy": sum(v) / len(v), "trials": len(v)}
            for (s, n, d), v in groups.items()]  # fmt: skip


def pivot(rows: list[dict], value: str, spread: str | None = None, fmt: str = "{:.2f}") -> tuple[list[dict], list[str]]:
    """Rows scheme x columns length (``16k``), each cell ``value`` (± ``spread`` when it is not zero)."""
    schemes = list(dict.fromkeys(row["scheme"] for row in rows))
    lengths = sorted({row["length"] for row in rows})
    table = []
    for scheme in schemes:
        line = {"scheme": scheme}
        for row in rows:
            if row["scheme"] == scheme:
                text = fmt.format(row[value])
                if spread and row.get(spread):
                    text += " ± " + fmt.format(row[spread])
                line[format_length(row["length"])] = text
        table.append(line)
    return table, ["scheme"] + [format_length(n) for n in lengths]


def retrieval_summary(rows: list[dict]) -> list[dict]:
    """Accuracy per (scheme, length), averaged over depths."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["scheme"], row["length"]), []).append(row["accuracy"])
    return [{"scheme": s, "length": n, "accuracy": sum(v) / len(v)} for (s, n), v in groups.items()]


def write_report(run: report.RunFolder, title: str = "pos_swap evaluation") -> list[report.Section]:
    """Terminal tables, PNG plots and report.html for the run's cells (the folder's when it has one)."""
    trained = run.meta.get("trained_context")
    sections = []
    ppl_rows = perplexity_table(run.cells)
    if ppl_rows:
        for value, name, what in (("ppl_tail", "ppl_tail.png", "last-quarter perplexity"),
                                  ("ppl", "ppl.png", "whole-window perplexity")):  # fmt: skip
            series, bands = {}, {}
            for scheme in dict.fromkeys(r["scheme"] for r in ppl_rows):
                mine = sorted((r for r in ppl_rows if r["scheme"] == scheme), key=lambda r: r["length"])
                xs, ys, sd = [r["length"] for r in mine], [r[value] for r in mine], [r[value + "_std"] for r in mine]
                series[scheme] = (xs, ys)
                bands[scheme] = ([y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)])
            if run.path is not None:
                report.line_plot(run.path / name, series, xlabel="window length (tokens)", ylabel=what,
                                 title=f"{what} by length", marks={"trained context": trained} if trained else None,
                                 logx=True, logy=True, bands=bands,
                                 xticks={n: format_length(n) for n in {r["length"] for r in ppl_rows}})  # fmt: skip
            sections.append(report.Section(what.capitalize(), table=pivot(ppl_rows, value, value + "_std"),
                                           images=[name],
                                           text="Mean ± spread over windows; each window is cut from the start of "
                                                "the text."))  # fmt: skip
    for task in ("passkey", "multikey"):
        rows = accuracy_table(run.cells, task)
        if not rows:
            continue
        if run.path is not None:
            panels = {}
            depths = sorted({r["depth"] for r in rows})
            lengths = sorted({r["length"] for r in rows})
            for scheme in dict.fromkeys(r["scheme"] for r in rows):
                grid = [[math.nan] * len(lengths) for _ in depths]
                for r in rows:
                    if r["scheme"] == scheme:
                        grid[depths.index(r["depth"])][lengths.index(r["length"])] = r["accuracy"]
                panels[scheme] = grid
            report.heatmaps(run.path / f"{task}.png", panels, xlabel="length", ylabel="needle depth",
                            xticks=[format_length(n) for n in lengths], yticks=[f"{d:.0%}" for d in depths],
                            vmin=0, vmax=1, cmap="RdYlGn", annotate=True, colorbar="accuracy")  # fmt: skip
        sections.append(report.Section(f"{task} retrieval accuracy",
                                       table=pivot(retrieval_summary(rows), "accuracy", fmt="{:.0%}"),
                                       images=[f"{task}.png"],
                                       text="Accuracy over depths and trials (exact match of the first number of a "
                                            "greedy, cached reply); the heatmap shows each depth."))  # fmt: skip
    if run.path is not None:
        report.write_html(run.path / "report.html", title, sections, meta=run.meta)
    return sections


def print_sections(sections: list[report.Section]) -> None:
    for section in sections:
        print(f"\n{section.heading}")
        print(report.format_table(*section.table))

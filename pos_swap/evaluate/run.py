"""Evaluation runs: schemes x tasks x lengths on one model, written cell by cell to a run folder and summarized as
terminal tables, PNG plots and ``report.html``. ``pos-swap eval``, ``recommend`` and ``demo`` call these."""

import contextlib
import dataclasses
import math
import textwrap
import time

import torch
from tqdm.auto import tqdm

from .. import archs, engine, report
from ..errors import PosSwapError
from ..loading import text_tokens
from . import ruler
from .ppl import bucket_losses, bucket_size, forwards, summarize, token_losses, window_perplexity
from .retrieval import DEPTHS, needle_for, retrieval_cells, sweep, trial_row, wilson_interval
from .specs import MIN_LENGTH, SAVED, SchemeSpec, format_length, parse_depths

TASKS = ("ppl", "passkey", "multikey")  # and lm-eval's RULER tasks, named ruler:NAME (:mod:`.ruler`)
RETRIEVAL = ("passkey", "multikey")


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
        self.tasks = ruler.normalize(self.tasks)
        unknown = [task for task in self.tasks if task not in TASKS and ruler.task_name(task) is None]
        if unknown or not self.tasks:
            raise PosSwapError(f"Unknown task(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)} "
                               f"or lm-eval's RULER tasks as ruler:NAME (e.g. ruler:niah_single_1).")  # fmt: skip
        for name, value in (("trials", self.trials), ("windows", self.windows)):
            if value < 1:
                raise PosSwapError(f"--{name} must be at least 1; got {value}.")
        self.retrieval_lengths = self.retrieval_lengths or self.lengths
        for length in self.lengths + self.retrieval_lengths:
            if isinstance(length, bool) or not isinstance(length, int) or length < MIN_LENGTH:
                raise PosSwapError(f"Lengths are whole numbers of tokens >= {MIN_LENGTH}; got {length!r}.")
        self.depths = parse_depths(self.depths)

    def cells(self):
        """Every cell as ``(scheme, task, length, index)``; index = window for ppl, (depth, trial) for retrieval."""
        for spec in self.schemes:
            for task in self.tasks:
                if task == "ppl":
                    yield from ((spec, task, length, w) for length in self.lengths for w in range(self.windows))
                elif ruler.task_name(task):  # one cell of --trials samples per length
                    yield from ((spec, task, length, 0) for length in self.retrieval_lengths)
                else:
                    yield from ((spec, task, length, (d, t)) for length in self.retrieval_lengths
                                for d in self.depths for t in range(self.trials))  # fmt: skip

    def longest(self) -> int:
        return max(self.lengths + (self.retrieval_lengths if set(self.tasks) - {"ppl"} else []))


def cell_key(spec: SchemeSpec, task: str, length: int, index) -> str:
    where = f"w{index}" if task == "ppl" else "all" if ruler.task_name(task) else f"d{index[0]:g}/t{index[1]}"
    return f"{spec.label}|{task}|{length}|{where}"


# -- the run ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def applied(model, spec: SchemeSpec):
    """The model under ``spec`` inside the block; yields what :func:`pos_swap.describe` says then (None: native).
    ``native`` is the model without any patch, also when it was loaded from a folder saved with one; ``saved`` is
    the model as loaded, with that patch."""
    if spec.name == SAVED:
        yield engine.describe(model)
        return
    with engine.unpatched(model):
        if spec.name is None:
            yield engine.describe(model)
            return
        with engine.patched(model, spec.name, **spec.params):
            yield engine.describe(model)


def check_plan(plan: Plan, tokenizer, tokens: torch.Tensor, model) -> None:
    """Fail before any compute: windows the text cannot fill, retrieval lengths too short for their prompt, a
    scheme whose parameters do not fit ``model`` (the loaded model, or a skeleton of it without weights)."""
    if "ppl" in plan.tasks:
        for length in plan.lengths:
            if tokens.numel() < length * plan.windows:
                fit = tokens.numel() // length
                raise PosSwapError(
                    f"The text holds {tokens.numel()} tokens: {plan.windows} windows of {length} tokens need "
                    f"{length * plan.windows}. Pass a longer text (--text FILE), shorter --lengths or "
                    f"--windows {fit}." if fit else
                    f"The text holds {tokens.numel()} tokens, fewer than the length {length}. Pass a longer text "
                    f"(--text FILE) or shorter --lengths."
                )  # fmt: skip
    if any(ruler.task_name(task) for task in plan.tasks):
        ruler.check_installed()
    for task in set(plan.tasks) & set(RETRIEVAL):
        retrieval_cells(task, plan.retrieval_lengths, plan.depths, plan.trials)
        needle_for(tokenizer, task, min(plan.retrieval_lengths), 0.5, 0, plan.seed,
                   **({"keys": plan.keys} if task == "multikey" else {}))  # fmt: skip
    for spec in plan.schemes:
        if spec.name == SAVED:
            if (engine.describe(model) or getattr(model.config, engine.RECORD_KEY, None)) is None:
                raise PosSwapError(f"'{SAVED}' measures the patch a model folder was saved with, but this model "
                                   f"carries none; drop '{SAVED}' from the schemes.")  # fmt: skip
        elif spec.name is not None:
            engine.configure(model, spec.name, spec.params)


def plan_check(plan: Plan, text=None):
    """A check for :func:`load` (``check=``): :func:`check_plan` on the text's tokens and the model's skeleton."""
    return lambda tokenizer, model: check_plan(plan, tokenizer, text_tokens(tokenizer, text)[0], model)


def position_limit(model) -> int | None:
    """The longest input the model can take as it is now: a native learned table's rows; None when unbounded."""
    if engine.describe(model) is not None or archs.lookup(model).family != archs.LEARNED:
        return None
    return archs.position_table(model).num_embeddings - archs.lookup(model).table_offset


def evaluate(model, tokenizer, plan: Plan, *, out=None, model_name: str = "", text=None, resume: bool = False,
             overwrite: bool = False, progress: bool = True) -> report.RunFolder:  # fmt: skip
    """Measure every cell of ``plan`` on ``model`` and return the run (its ``cells``; with ``out``, a folder whose
    results.json is rewritten after every cell, so ``resume=True`` skips what an interrupted run finished)."""
    tokens, text_label = text_tokens(tokenizer, text)
    check_plan(plan, tokenizer, tokens, model)
    meta = {"model": model_name or getattr(model.config, "_name_or_path", ""), "text": text_label,
            "text_tokens": tokens.numel(), "trained_context": archs.trained_context(model.config),
            **{k: v for k, v in dataclasses.asdict(plan).items() if k != "schemes"},
            "schemes": [spec.label for spec in plan.schemes]}  # fmt: skip
    # cells are keyed by scheme, so a resumed sweep may add schemes; it keeps those it measured before, and a
    # merged run (pos-swap merge) resumes as the run it stands for
    run = report.RunFolder(out, kind="eval", meta=meta, resume=resume, overwrite=overwrite,
                           may_change=("schemes", "merged_from"))  # fmt: skip
    run.meta["schemes"] = list(dict.fromkeys([cell["scheme"] for cell in run.cells] + meta["schemes"]))
    todo = [cell for cell in plan.cells() if not run.done(cell_key(*cell))]
    bar = tqdm(total=len(todo), desc="evaluation", disable=not progress)
    for spec in plan.schemes:
        mine = [cell for cell in todo if cell[0] is spec]
        if not mine:
            continue
        with applied(model, spec) as described:
            limit, consistent = position_limit(model), engine.causal_consistent(model)
            common = {"scheme": spec.label, "patch": described, "model": meta["model"], "text": text_label,
                      "seed": plan.seed, "causal_consistent": consistent, "shared": plan.shared and consistent}  # fmt: skip
            for task in plan.tasks:
                bar.set_postfix_str(f"{spec.label} {task}")
                cells = [(length, index) for _, kind, length, index in mine if kind == task]
                for length, index in [cell for cell in cells if limit is not None and cell[0] > limit]:
                    run.add({"key": cell_key(spec, task, length, index), "task": task, "length": length, **common,
                             "unmeasured": f"{spec.label} has a learned table of {limit} positions: it cannot run "
                                           f"{length} tokens"})  # fmt: skip
                    bar.update(1)
                cells = [cell for cell in cells if limit is None or cell[0] <= limit]
                measured = _perplexities if task == "ppl" else _ruler if ruler.task_name(task) else _retrievals
                clock = time.perf_counter()
                for length, index, result in measured(model, tokenizer, tokens, plan, task, cells, common["shared"]):
                    run.add({"key": cell_key(spec, task, length, index), "task": task, "length": length, **common,
                             **result, "seconds": round(time.perf_counter() - clock, 3)})  # fmt: skip
                    bar.update(1)
                    clock = time.perf_counter()
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


def _ruler(model, tokenizer, tokens, plan: Plan, task: str, cells, shared: bool):
    """``(length, 0, result)`` of each RULER cell: ``plan.trials`` samples of the task at that length."""
    for length, index in cells:
        yield length, index, ruler.run(model, tokenizer, ruler.task_name(task), length, plan.trials, plan.seed)


# -- summaries, plots and the report ------------------------------------------------------------------------------
def measured_cells(cells: list[dict]) -> list[dict]:
    """The cells that hold a measurement (not those that say why they could not be measured)."""
    return [cell for cell in cells if "unmeasured" not in cell]


def perplexity_table(cells: list[dict]) -> list[dict]:
    """One row per (scheme, length): mean and spread over windows of whole-window and last-quarter perplexity."""
    groups: dict[tuple, list[dict]] = {}
    for cell in measured_cells(cells):
        if cell["task"] == "ppl":
            groups.setdefault((cell["scheme"], cell["length"]), []).append(cell)
    return [{"scheme": scheme, "length": length, **summarize(group)} for (scheme, length), group in groups.items()]


def accuracy_table(cells: list[dict], task: str, by=("scheme", "length", "depth")) -> list[dict]:
    """One row per group of ``by`` (default: scheme, length, depth): exact-match accuracy over its trials with the
    Wilson 95% interval (``low``, ``high``), and the mean log-probability of the answer (``logprob``)."""
    groups: dict[tuple, list[dict]] = {}
    for cell in measured_cells(cells):
        if cell["task"] == task:
            groups.setdefault(tuple(cell[key] for key in by), []).append(cell)
    rows = []
    for values, group in groups.items():
        hits, logprobs = sum(c["correct"] for c in group), [c.get("answer_logprob", math.nan) for c in group]
        low, high = wilson_interval(hits, len(group))
        rows.append({**dict(zip(by, values)), "accuracy": hits / len(group), "successes": hits, "trials": len(group),
                     "low": low, "high": high, "logprob": sum(logprobs) / len(logprobs)})  # fmt: skip
    return rows


def accuracy_label(row: dict) -> str:
    """``"2/3 67% [21-94%]"``: hits of trials, accuracy and its Wilson 95% interval."""
    return f"{row['successes']}/{row['trials']} {row['accuracy']:.0%} [{row['low']:.0%}-{row['high']:.0%}]"


def position_curves(cells: list[dict], bucket: int) -> dict:
    """Perplexity by position per scheme: ``{scheme: (bucket centres, perplexities)}`` from the ``bucket``-token
    position buckets of its longest perplexity windows (mean loss over windows per bucket, then exp)."""
    curves = {}
    for scheme in dict.fromkeys(c["scheme"] for c in cells if c["task"] == "ppl"):
        mine = [c for c in cells if c["task"] == "ppl" and c["scheme"] == scheme and "buckets" in c]
        if not mine:
            continue
        longest = max(c["length"] for c in mine)
        buckets = torch.tensor([c["buckets"] for c in mine if c["length"] == longest], dtype=torch.float64)
        centres = [min(longest, (i + 0.5) * bucket) for i in range(buckets.shape[1])]
        curves[scheme] = (centres, buckets.mean(dim=0).exp().tolist())
    return curves


def relative_curves(curves: dict) -> dict:
    """Each curve of :func:`position_curves` divided, bucket by bucket, by the lowest perplexity any scheme has
    there (1 = the best scheme at that position): differences of a few percent that the text's own ups and downs
    hide on the absolute plot."""
    best = torch.tensor([ys for _, ys in curves.values()], dtype=torch.float64).min(dim=0).values
    return {scheme: (xs, (torch.tensor(ys, dtype=torch.float64) / best).tolist()) for scheme, (xs, ys) in curves.items()}


def cost_table(cells: list[dict]) -> list[dict]:
    """Minutes of measuring per scheme and task (``"total"`` beside them), from the cells that record ``seconds``."""
    timed = [c for c in measured_cells(cells) if "seconds" in c]
    tasks = list(dict.fromkeys(c["task"] for c in timed))
    rows = []
    for scheme in dict.fromkeys(c["scheme"] for c in timed):
        row = {"scheme": scheme, **{task: 0.0 for task in tasks}}
        for c in timed:
            if c["scheme"] == scheme:
                row[c["task"]] += c["seconds"] / 60
        rows.append({**row, "total": sum(row[task] for task in tasks)})
    return rows


def clock_time(minutes: float) -> str:
    """``"12:05"`` for 12.08 minutes."""
    seconds = round(minutes * 60)
    return f"{seconds // 60}:{seconds % 60:02d}"


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


def _forward_note(cells: list[dict]) -> str:
    """What the perplexity cells were read from: one forward per window start, or separate windows (and why)."""
    ppl_cells = [c for c in cells if c["task"] == "ppl"]
    separate = list(dict.fromkeys(c["scheme"] for c in ppl_cells if not c.get("shared", False)))
    unfit = list(dict.fromkeys(c["scheme"] for c in ppl_cells if c.get("causal_consistent") is False))
    note = "Windows are cut from the start of the text (mean ± spread over windows). "
    if not separate:
        return note + "Every length was read from one forward at the longest length per window start."
    if unfit:
        note += (f"Not causal-consistent (rows follow the whole window's length), so each window had its own "
                 f"forward: {', '.join(unfit)}. ")  # fmt: skip
    rest = [scheme for scheme in separate if scheme not in unfit]
    if rest:
        note += f"Separate forwards were asked for (--separate): {', '.join(rest)}. "
    return note + "The other schemes read every length from one forward at the longest."


def write_report(run: report.RunFolder, title: str = "pos_swap evaluation", lead=()) -> list[report.Section]:
    """Terminal tables, PNG plots and report.html for the run's cells (the folder's when it has one), after the
    ``lead`` sections (e.g. a recommendation); the tables also go into results.json as its ``summary``."""
    trained = run.meta.get("trained_context")
    sections, summary = list(lead), {}
    ppl_rows = perplexity_table(run.cells)
    if ppl_rows:
        summary["perplexity"] = ppl_rows
        longest = max(r["length"] for r in ppl_rows)
        curves = position_curves(run.cells, bucket_size(longest))
        images = []
        if run.path is not None and curves:
            step = max(longest // 8, 1)
            axes = dict(xlabel="position in the window (tokens)",
                        marks={"trained context": trained} if trained and trained < longest else None,
                        xticks={x: format_length(x) if x else "0" for x in range(0, longest + 1, step)})  # fmt: skip
            report.line_plot(run.path / "ppl_position.png", curves, ylabel="perplexity of the tokens there", logy=True,
                             title=f"perplexity by position ({bucket_size(longest)}-token buckets, "
                                   f"{format_length(longest)} window)", **axes)  # fmt: skip
            images = ["ppl_position.png"]
            if len(curves) > 1 and len({len(ys) for _, ys in curves.values()}) == 1:
                relative = relative_curves(curves)
                top = min(2.0, max(max(ys) for _, ys in relative.values()))
                report.line_plot(run.path / "ppl_position_relative.png", relative, ylim=(0.99, top * 1.01),
                                 ylabel="perplexity / the best scheme's there",
                                 title="perplexity by position relative to the best scheme (1 = best; cut at 2x)",
                                 **axes)  # fmt: skip
                images.append("ppl_position_relative.png")
        note = _forward_note(run.cells)
        sections.append(report.Section("Last-quarter perplexity", table=pivot(ppl_rows, "ppl_tail", "ppl_tail_std"),
                                       images=images,
                                       text=f"{note} The plots: perplexity of each bucket of positions of the "
                                            f"longest window, and the same divided by the lowest of any scheme "
                                            f"in that bucket; the dashed line marks the trained context."))  # fmt: skip
        sections.append(report.Section("Whole-window perplexity", table=pivot(ppl_rows, "ppl", "ppl_std")))
    for task in ("passkey", "multikey"):
        rows = accuracy_table(run.cells, task)
        if not rows:
            continue
        pooled = accuracy_table(run.cells, task, by=("scheme", "length"))
        summary[task] = {"by_depth": rows, "by_length": pooled}
        images = []
        if run.path is not None:
            depths = sorted({r["depth"] for r in rows})
            lengths = sorted({r["length"] for r in rows})
            panels, labels, logprobs = {}, {}, {}
            for scheme in dict.fromkeys(r["scheme"] for r in rows):
                grids = [[[math.nan] * len(lengths) for _ in depths] for _ in range(2)]
                text = [[""] * len(lengths) for _ in depths]
                for r in rows:
                    if r["scheme"] == scheme:
                        i, j = depths.index(r["depth"]), lengths.index(r["length"])
                        grids[0][i][j], grids[1][i][j] = r["accuracy"], r["logprob"]
                        text[i][j] = f"{r['successes']}/{r['trials']}\n[{r['low']:.0%}-{r['high']:.0%}]"
                panels[scheme], logprobs[scheme], labels[scheme] = grids[0], grids[1], text
            axes = dict(xlabel="length", ylabel="needle depth", xticks=[format_length(n) for n in lengths],
                        yticks=[f"{d:.0%}" for d in depths], annotate=True)  # fmt: skip
            report.heatmaps(run.path / f"{task}.png", panels, vmin=0, vmax=1, cmap="RdYlGn", labels=labels,
                            colorbar="exact-match accuracy", **axes)  # fmt: skip
            scores = [r["logprob"] for r in rows if not math.isnan(r["logprob"])] or [0.0]
            report.heatmaps(run.path / f"{task}_logprob.png", logprobs, cmap="RdYlGn", vmin=min(scores), vmax=max(scores),
                            colorbar="log-probability of the answer (nats)", **axes)  # fmt: skip
            images = [f"{task}.png", f"{task}_logprob.png"]
        table = pivot([{**r, "label": accuracy_label(r)} for r in pooled], "label", fmt="{}")
        logprob_table = pivot(pooled, "logprob", fmt="{:.2f}")
        shared = all(c.get("shared", False) for c in run.cells if c["task"] == task)
        sections.append(report.Section(
            f"{task} retrieval accuracy", table=table, images=images,
            text="Exact match of the first number of a greedy, cached reply: hits/trials over depths and trials, "
                 "with the Wilson 95% interval; the first heatmap shows each depth. The second shows the continuous "
                 "score, the log-probability of the answer's tokens by teacher forcing (closer to 0 is better). "
                 + ("Trials shared their filler prefix through one cache." if shared else
                    "Some schemes prefilled every prompt afresh (not causal-consistent, or --separate).")))  # fmt: skip
        sections.append(report.Section(f"{task} answer log-probability (mean over depths and trials)",
                                       table=logprob_table))  # fmt: skip
    sections += _ruler_sections(run, summary)
    costs = cost_table(run.cells)
    if costs:
        summary["minutes"] = costs
        tasks = [key for key in costs[0] if key != "scheme"]
        sections.append(report.Section(
            "Wall time (minutes:seconds)", table=([{k: v if k == "scheme" else clock_time(v) for k, v in r.items()}
                                                   for r in costs], ["scheme"] + tasks),
            text="Measuring time of each scheme's cells, by task. A forward that several lengths share, or a filler "
                 "cache that several trials share, counts for the first cell that used it; resumed cells keep the "
                 "time of the run that measured them."))  # fmt: skip
    run.summarize(summary)
    unmeasured = {(c["scheme"], c["length"]): c["unmeasured"] for c in run.cells if "unmeasured" in c}
    if unmeasured:
        rows = [{"scheme": s, "length": format_length(n), "why": why} for (s, n), why in unmeasured.items()]
        sections.append(report.Section("Not measured", table=(rows, ["scheme", "length", "why"])))
    if run.path is not None:
        report.write_html(run.path / "report.html", title, sections, meta=run.meta)
    return sections


def _ruler_sections(run: report.RunFolder, summary: dict) -> list[report.Section]:
    """One table per RULER task (scheme x length: mean score, Wilson 95% interval, samples) and one heatmap of
    them all, a panel per scheme; each task's rows also go into ``summary``."""
    cells = [c for c in measured_cells(run.cells) if ruler.task_name(c["task"])]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    if not tasks:
        return []
    keep = ("scheme", "length", "score", "low", "high", "samples")
    for task in tasks:
        summary[task] = [{key: c[key] for key in keep} for c in cells if c["task"] == task]
    images = []
    if run.path is not None:
        lengths = sorted({c["length"] for c in cells})
        panels, labels = {}, {}
        for scheme in dict.fromkeys(c["scheme"] for c in cells):
            panels[scheme] = [[math.nan] * len(lengths) for _ in tasks]
            labels[scheme] = [[""] * len(lengths) for _ in tasks]
            for c in cells:
                if c["scheme"] == scheme:
                    i, j = tasks.index(c["task"]), lengths.index(c["length"])
                    panels[scheme][i][j] = c["score"]
                    labels[scheme][i][j] = f"{c['score']:.0%}\n[{c['low']:.0%}-{c['high']:.0%}]"
        report.heatmaps(run.path / "ruler.png", panels, xlabel="length", ylabel="RULER task", vmin=0, vmax=1,
                        xticks=[format_length(n) for n in lengths], yticks=[ruler.task_name(t) for t in tasks],
                        cmap="RdYlGn", annotate=True, labels=labels, colorbar="RULER score")  # fmt: skip
        images = ["ruler.png"]
    sections = []
    for task in tasks:
        rows = [{**r, "label": f"{r['score']:.0%} [{r['low']:.0%}-{r['high']:.0%}] of {r['samples']}"}
                for r in summary[task]]  # fmt: skip
        sections.append(report.Section(
            f"{task} (lm-evaluation-harness)", table=pivot(rows, "label", fmt="{}"), images=images,
            text="RULER's score (the share of each sample's needles found in the greedy answer, averaged over the "
                 "samples) with its Wilson 95% interval, from lm-eval run on the patched model; every scheme "
                 "answers the same seeded samples."))  # fmt: skip
        images = []
    return sections


def print_sections(sections: list[report.Section]) -> None:
    for section in sections:
        print(f"\n{section.heading}")
        print(report.format_table(*section.table))
        if section.text:
            print(textwrap.fill(section.text, 116))

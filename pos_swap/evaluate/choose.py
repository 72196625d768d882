"""Choose a training-free setting for a target length by measuring a grid on the user's text.

The grid: native, then every registered scheme that fits the model's positional family and offers settings for
(trained, target) through ``Scheme.candidates`` (each states its rule: ``dynamic-yarn`` per position and whole
window, ``dynamic`` and ``yarn`` at factors from target / trained, Self-Extend by the LongLM rule, leaky and
capped ReRoPE, Dual Chunk Attention, ...). Every setting is measured at the target length (last-quarter
perplexity, and passkey retrieval at several depths: exact match, and the continuous score when the retrieval
cells carry it) and at the trained length L0 (whole-window perplexity). The pick is the best by the objective
among the settings that stay within ``tolerance`` of native perplexity at L0 (all of them, when none does). No
setting is preferred in advance: the ranking is what the text gives.
"""

import dataclasses
import math

from .. import archs
from ..errors import PosSwapError, did_you_mean
from ..registry import get_scheme, list_schemes
from .run import Plan, check_plan, evaluate, measured_cells, perplexity_table, text_tokens
from .specs import NATIVE, SchemeSpec, format_length, label

OBJECTIVES = {
    "balanced": "lowest sum of two losses in nats per token, the last-quarter loss at the target and the loss of "
                "the passkey's answer tokens (the default: a setting must both read the text and find the needle)",
    "retrieval": "lowest loss of the passkey's answer tokens at the target (exact matches break ties)",
    "perplexity": "lowest last-quarter perplexity at the target",
}  # fmt: skip
DEPTHS = (0.25, 0.5, 0.75)


@dataclasses.dataclass
class Options:
    """How :func:`recommend` measures and ranks. ``trials``: retrieval prompts per depth (default 1 with ``quick``,
    2 without); ``quick`` also keeps only each scheme's first setting; ``schemes``: a shortlist of scheme names to
    measure (native is always measured; empty: every scheme that applies)."""

    objective: str = "balanced"
    tolerance: float = 0.01
    quick: bool = False
    windows: int = 1
    depths: tuple[float, ...] = DEPTHS
    trials: int | None = None
    schemes: tuple[str, ...] = ()

    def __post_init__(self):
        for name in self.schemes:
            get_scheme(name)  # an unknown name is an error that suggests the closest one
        if self.objective not in OBJECTIVES:
            raise PosSwapError(
                f"Unknown objective '{self.objective}'.{did_you_mean(self.objective, OBJECTIVES)} Choose one of "
                f"{', '.join(OBJECTIVES)}."
            )
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise PosSwapError(
                f"--tolerance must be a finite number >= 0 (0.01 = 1% change of perplexity at the trained length); "
                f"got {self.tolerance}."
            )
        self.trials = self.trials or (1 if self.quick else 2)


def grid(trained: int, target: int, family: str = archs.ROTARY, quick: bool = False,
         only: tuple[str, ...] = ()) -> list[SchemeSpec]:  # fmt: skip
    """Native, then every setting the registered schemes of ``family`` (those named in ``only``, when given) offer
    for (``trained``, ``target``); a name in ``only`` that offers none is an error that lists the ones that do."""
    specs, offering = [SchemeSpec(NATIVE, None, {})], []
    for name in list_schemes():
        scheme = get_scheme(name)
        settings = scheme.candidates(trained, target) if family in scheme.families else []
        offering += [name] if settings else []
        if settings and (not only or name in only):
            specs += [SchemeSpec(label(name, p), name, p) for p in (settings[:1] if quick else settings)]
    idle = [name for name in only if name not in offering]
    if idle:
        raise PosSwapError(
            f"No training-free setting of {', '.join(idle)} applies to a {family} model trained on {trained} tokens "
            f"at {format_length(target)}; drop it from --schemes. Schemes with one: {', '.join(offering)}."
        )
    return specs


def plan_for(trained: int, target: int, options: Options, family: str = archs.ROTARY) -> Plan:
    """What :func:`recommend` measures: perplexity at the trained length and the target, passkeys at the target."""
    return Plan(schemes=grid(trained, target, family, options.quick, options.schemes), lengths=sorted({trained, target}),
                tasks=("ppl", "passkey"), retrieval_lengths=[target], depths=options.depths, trials=options.trials,
                windows=options.windows)  # fmt: skip


def plan_check(target: int, options: Options, text=None):
    """A check for :func:`pos_swap.loading.load` (``check=``): the plan fits the text and the model's config."""
    def check(tokenizer, model):
        plan = plan_for(archs.trained_context(model.config), target, options, archs.lookup(model).family)
        check_plan(plan, tokenizer, text_tokens(tokenizer, text)[0], model)

    return check


def python_line(spec: SchemeSpec) -> str:
    """The one line of Python that applies ``spec``."""
    if spec.name is None:
        return "# no patch: the model is best as it is"
    params = "".join(f", {k}={v!r}" for k, v in spec.params.items())
    return f'pos_swap.patch(model, "{spec.name}"{params})'


def score(row: dict, objective: str) -> tuple:
    """The sort key of a ranking row under ``objective`` (lower is better)."""
    tail_loss = math.log(row["target_ppl_tail"])
    answer = row["answer_loss"]
    if objective == "perplexity":
        return (tail_loss,)
    if objective == "retrieval":
        return (answer, -row["passkey"])
    return (tail_loss + answer, -row["passkey"])


def rank(cells: list[dict], specs: list[SchemeSpec], trained: int, target: int, options: Options) -> list[dict]:
    """One row per setting, best first by ``options.objective``; ``keeps_native`` marks the settings within
    ``options.tolerance`` of native perplexity at the trained length."""
    at = {(r["scheme"], r["length"]): r for r in perplexity_table(cells)}
    native_inside = at[(NATIVE, trained)]["ppl"] if (NATIVE, trained) in at else None
    passkeys = [c for c in measured_cells(cells) if c["task"] == "passkey" and c["length"] == target]
    rows = []
    for spec in specs:
        mine = [c for c in passkeys if c["scheme"] == spec.label]
        if (spec.label, target) not in at or (spec.label, trained) not in at or not mine:  # e.g. past a learned table
            rows.append({"scheme": spec.label, "score": math.inf, "keeps_native": False, "passkey_hits": "not measured"})
            continue
        hits = sum(c["correct"] for c in mine)
        row = {"scheme": spec.label, "target_ppl_tail": at[(spec.label, target)]["ppl_tail"],
               "answer_loss": sum(-c["answer_logprob"] / c["answer_tokens"] for c in mine) / len(mine),
               "passkey": hits / len(mine), "passkey_hits": f"{hits}/{len(mine)}",
               "trained_ppl": at[(spec.label, trained)]["ppl"]}  # fmt: skip
        row["inside_change"] = row["trained_ppl"] / native_inside - 1 if native_inside else 0.0
        row["keeps_native"] = abs(row["inside_change"]) <= options.tolerance
        row["score"] = score(row, options.objective)[0]
        rows.append(row)
    return sorted(rows, key=lambda r: (not r["keeps_native"], score(r, options.objective) if "passkey" in r else (math.inf,)))


def recommend(model, tokenizer, target: int, *, text=None, options: Options | None = None, out=None,
              resume: bool = False, overwrite: bool = False, progress: bool = True, specs=None,
              model_name: str = "") -> dict:  # fmt: skip
    """Measure the grid (or ``specs``) at ``target`` and at the trained length; return ``{"ranking": rows,
    "best": SchemeSpec, "line": python code, "run": RunFolder, "trained", "target", "options"}``. Rows are sorted
    best first: the settings that keep native perplexity inside the trained context, then the others.
    ``model_name`` is recorded as the run's model, as :func:`~pos_swap.evaluate.run.evaluate` does."""
    options = options or Options()
    trained = archs.trained_context(model.config)
    plan = plan_for(trained, target, options, archs.lookup(model).family)
    if specs is not None:
        plan.schemes = list(specs)
    run = evaluate(model, tokenizer, plan, out=out, model_name=model_name, text=text, resume=resume,
                   overwrite=overwrite, progress=progress)  # fmt: skip
    ranking = rank(run.cells, plan.schemes, trained, target, options)
    best = next(spec for spec in plan.schemes if spec.label == ranking[0]["scheme"])
    return {"ranking": ranking, "best": best, "line": python_line(best), "run": run, "trained": trained,
            "target": target, "options": options}  # fmt: skip


COLUMNS = ["scheme", "score", "target_ppl_tail", "answer_loss", "passkey_hits", "trained_ppl", "inside_change",
           "keeps_native"]  # fmt: skip


def _printable(row: dict) -> dict:
    change = f"{row['inside_change']:+.1%}" if "inside_change" in row else ""
    return {**row, "inside_change": change, "score": f"{row['score']:.3f}"}


def section(result: dict):
    """The ranking as the first section of ``report.html``."""
    from ..report import Section

    rows = [_printable(r) for r in result["ranking"]]
    head, legend, *_ = explain(result).split("\n")
    return Section(f"Recommendation: {result['line']}", text=f"{head}. {legend}.", table=(rows, COLUMNS))


def explain(result: dict) -> str:
    """The ranked table with every column, what the columns mean, and the line to use."""
    from ..report import format_table

    options = result["options"]
    trained, target = format_length(result["trained"]), format_length(result["target"])
    rows = [_printable(r) for r in result["ranking"]]
    depths = ", ".join(f"{d:.0%}" for d in options.depths)
    return "\n".join([
        f"ranked by objective '{options.objective}': {OBJECTIVES[options.objective]}",
        f"target_ppl_tail: last-quarter perplexity at {target}; answer_loss: nats per answer token of the passkey at "
        f"{target} (depths {depths}, {options.trials} trial(s) each), passkey_hits: exact matches; trained_ppl: "
        f"whole-window perplexity at the trained {trained}, inside_change against native (tolerance "
        f"{options.tolerance:.1%})",
        format_table(rows, COLUMNS, floats="{:.3f}"),
        "",
        f"use:\n    {result['line']}",
    ])  # fmt: skip

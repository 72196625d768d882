"""Choose a training-free setting for a target length by measuring a small grid on the user's text.

The grid: native, ``dynamic-yarn``, ``dynamic`` and ``yarn`` at factors around target / trained, and Self-Extend
with window and group from the LongLM rule ((L0 - window) * group + window >= target). Every setting is measured
at the target length and at the trained length L0; the pick is the lowest last-quarter perplexity at the target
among the settings that stay within ``tolerance`` of native whole-window perplexity at L0 (all of them, when none
does). No setting is preferred in advance: the ranking is what the text gives.
"""

import math

from .. import archs
from .run import Plan, evaluate, perplexity_table
from .specs import NATIVE, SchemeSpec


def self_extend_setting(trained: int, target: int, window: int) -> SchemeSpec:
    """Self-Extend with neighbour ``window`` and the smallest group G with (L0 - window) * G + window >= target."""
    group = max(2, math.ceil((target - window) / (trained - window)))
    window -= window % group  # the window must be a multiple of the group
    return SchemeSpec(f"self-extend:window={window}:group={group}", "self-extend", {"window": window, "group": group})


def grid(trained: int, target: int) -> list[SchemeSpec]:
    """The settings :func:`recommend` measures for a model trained on ``trained`` tokens, used at ``target``."""
    ratio = max(target / trained, 1.25)
    factors = sorted({round(ratio * m, 2) for m in (1.0, 1.5, 2.0)})
    specs = [SchemeSpec(NATIVE, None, {}), SchemeSpec("dynamic-yarn", "dynamic-yarn", {})]
    specs += [SchemeSpec(f"dynamic:factor={f:g}", "dynamic", {"factor": f}) for f in factors[:1]]
    specs += [SchemeSpec(f"yarn:factor={f:g}", "yarn", {"factor": f}) for f in factors]
    windows = sorted({max(trained // 8, 16), max(trained // 4, 32)})
    specs += list({s.label: s for s in (self_extend_setting(trained, target, w) for w in windows)}.values())
    return specs


def python_line(spec: SchemeSpec) -> str:
    """The one line of Python that applies ``spec``."""
    if spec.name is None:
        return "# no patch: the model is best as it is"
    params = "".join(f", {k}={v!r}" for k, v in spec.params.items())
    return f'pos_swap.patch(model, "{spec.name}"{params})'


def recommend(model, tokenizer, target: int, *, text=None, windows: int = 1, tolerance: float = 0.01, out=None,
              resume: bool = False, overwrite: bool = False, progress: bool = True, specs=None) -> dict:  # fmt: skip
    """Measure the grid (or ``specs``) at ``target`` and at the trained length; return ``{"ranking": rows,
    "best": SchemeSpec, "line": python code, "run": RunFolder}``. Rows are sorted best first."""
    trained = archs.trained_context(model.config)
    specs = specs or grid(trained, target)
    lengths = sorted({trained, target})
    run = evaluate(model, tokenizer, Plan(schemes=specs, lengths=lengths, windows=windows), out=out, text=text,
                   resume=resume, overwrite=overwrite, progress=progress)  # fmt: skip
    table = perplexity_table(run.cells)
    at = {(r["scheme"], r["length"]): r for r in table}
    native_inside = at[(NATIVE, trained)]["ppl"] if (NATIVE, trained) in at else None
    ranking = []
    for spec in specs:
        row = {"scheme": spec.label, "target_ppl_tail": at[(spec.label, target)]["ppl_tail"],
               "trained_ppl": at[(spec.label, trained)]["ppl"]}  # fmt: skip
        row["inside_change"] = row["trained_ppl"] / native_inside - 1 if native_inside else 0.0
        row["keeps_native"] = abs(row["inside_change"]) <= tolerance
        ranking.append(row)
    ranking.sort(key=lambda r: r["target_ppl_tail"])
    eligible = [r for r in ranking if r["keeps_native"]] or ranking
    best = next(spec for spec in specs if spec.label == eligible[0]["scheme"])
    return {"ranking": ranking, "best": best, "line": python_line(best), "run": run, "trained": trained, "target": target}

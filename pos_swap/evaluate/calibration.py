"""Calibrate DPE's group sizes for one model and target length from pos_swap's own measurements.

DPE gives each group of rotary planes its own Self-Extend group size; its paper searches them with needle tests,
one group at a time. ``calibrate`` does the same search, made cheaper by two measurements pos_swap already has:

1. **Frequency use** (``pos-swap probe``'s RoPE frequency use): the mean |q| x |k| of every rotary plane over
   layers and heads, from one forward of a short haystack at most the trained context long. A group whose planes
   carry little of the scores changes them little whatever its size, so the groups are searched in the order of
   their share of the use, the most used first, and only the first ``tune`` of them.
2. **The continuous retrieval score**: the log-probability of the passkey's answer tokens (teacher forced through
   the cache, :mod:`pos_swap.evaluate.retrieval`) at the target length over a few depths. It moves before the
   exact match flips, so a handful of prompts ranks settings.

The search starts where Self-Extend would (every group at G, the smallest power of two >= 2 with
(trained - W) G + W >= target, W a power of two near trained / 8) and tries, for each searched group, G / 4, G / 2
and 2 G (``quick``: one group, G / 2 and 2 G) with the other groups at their best so far, keeping a change only when it
raises the objective: the mean answer log-probability per token over the depths. What it optimises is that score
and nothing else: perplexity is not measured.
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import archs, engine
from ..errors import PosSwapError
from ..schemes.dpe import power_of_two_below
from . import retrieval
from .specs import format_length

CALIBRATED = ("dpe",)  # schemes calibrate knows how to search
RESULTS = "calibrate.json"
DEPTHS = (0.25, 0.5, 0.75)
STEPS = (0.25, 0.5, 2.0)  # the sizes tried for a searched group, as multiples of the start G
QUICK_STEPS = (0.5, 2.0)
GROUPS = 8  # plane groups, as in the DPE paper (fewer when they do not divide the planes)
PROBE_TOKENS = 1024  # the haystack of the frequency-use forward (at most the trained context)


def plane_groups(planes: int, wanted: int = GROUPS) -> int:
    """The largest number of equal plane groups <= ``wanted`` that divides ``planes``."""
    return max(n for n in range(1, min(wanted, planes) + 1) if planes % n == 0)


def start_setting(trained: int, target: int) -> tuple[int, int]:
    """``(window, group)``: W the largest power of two <= trained / 8 and G the smallest power of two >= 2 with
    (trained - W) G + W >= target (LongLM's rule; powers of two so that every size searched divides W)."""
    window = power_of_two_below(max(1, trained // 8))
    group = 2
    while (trained - window) * group + window < target:
        group *= 2
    return window, group


def check(target: int, *, groups: int | None = None, window: int | None = None, tune: int = 2):
    """A check for :func:`pos_swap.loading.load` (``check=``): everything calibrating needs from the config,
    before the weights load."""

    def check_model(tokenizer, model):
        if engine.read_record(model.config) is not None:
            raise PosSwapError(
                "This checkpoint carries a pos_swap patch; calibrate measures a model's own positions. Give the "
                "original checkpoint."
            )
        if archs.lookup(model).family != archs.ROTARY:
            raise PosSwapError(f"dpe groups rotary planes, and this '{model.config.model_type}' model has no rotary positions.")
        trained = archs.trained_context(model.config)
        if target <= trained:
            raise PosSwapError(
                f"--length {target} is within the trained context ({trained}); dpe extends a context: calibrate at a "
                f"length beyond it, e.g. {2 * trained}."
            )
        plan(model, target, groups=groups, window=window, tune=tune)

    return check_model


def plan(model, target: int, *, groups: int | None = None, window: int | None = None, tune: int = 2) -> dict:
    """The search's fixed parts for ``model`` at ``target``: planes, group count, window and start G, checked."""
    if isinstance(tune, bool) or not isinstance(tune, int) or tune < 0:
        raise PosSwapError(f"--tune is the number of plane groups to search, a whole number >= 0; got {tune!r}.")
    planes = archs.rotary_slots(model)[0].dim // 2
    count = plane_groups(planes) if groups is None else groups
    if isinstance(count, bool) or not isinstance(count, int) or count < 1 or planes % count:
        fits = ", ".join(str(n) for n in range(1, planes + 1) if planes % n == 0)
        raise PosSwapError(f"--groups {count!r} must divide this model's {planes} rotary planes: use one of {fits}.")
    trained = archs.trained_context(model.config)
    default_window, group = start_setting(trained, target)
    window = default_window if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % (2 * group):
        raise PosSwapError(
            f"--window {window!r} must be a multiple of {2 * group} (twice the start group {group}, so that every "
            f"size searched divides it); the default is {default_window}."
        )
    return {"planes": planes, "groups": count, "window": window, "start_group": group, "tune": min(tune, count)}


def frequency_use(model, tokenizer, tokens: int) -> np.ndarray:
    """Mean |q| x |k| of every rotary plane ``(F,)``, highest frequency first, over layers and heads: one forward
    of ``tokens`` tokens of the passkey's filler, as ``pos-swap probe`` measures it."""
    from ..probe.observers import attention_stats

    ids = haystack(tokenizer, tokens)
    device = model.get_input_embeddings().weight.device
    with attention_stats(model, statistics=["frequency_norms"]) as stats, torch.no_grad():
        model(torch.tensor([ids], device=device))
    result = stats.result()
    return (result["query_frequency_norms"] * result["key_frequency_norms"]).mean(axis=(0, 1))


def haystack(tokenizer, tokens: int) -> list[int]:
    """The first ``tokens`` token ids of the passkey's filler repeated (every token is at least one character)."""
    return tokenizer((retrieval.FILLER + " ") * (tokens // 8 + 1), add_special_tokens=False)["input_ids"][:tokens]


def score(model, tokenizer, target: int, window: int, sizes: list[int], depths, seed: int) -> dict:
    """One setting measured: passkeys at ``target`` under ``dpe`` with ``sizes``; the objective is the mean
    answer log-probability per token."""
    with engine.patched(model, "dpe", window=window, groups=sizes):
        rows = retrieval.passkey(model, tokenizer, [target], depths, seed=seed, progress=False)
    per_token = [row["answer_logprob"] / row["answer_tokens"] for row in rows]
    return {"groups": list(sizes), "objective": float(np.mean(per_token)), "hits": sum(r["correct"] for r in rows),
            "trials": len(rows), "depths": {str(r["depth"]): {"logprob_per_token": p, "correct": r["correct"],
                                                              "reply": r["reply"]} for r, p in zip(rows, per_token)}}  # fmt: skip


def python_line(window: int, sizes: list[int]) -> str:
    return f'pos_swap.patch(model, "dpe", window={window}, groups={list(sizes)})'


def calibrate(model, tokenizer, target: int, *, groups: int | None = None, window: int | None = None,
              depths=DEPTHS, tune: int = 2, quick: bool = False, seed: int = 0, out=None,
              progress: bool = True) -> dict:  # fmt: skip
    """Choose DPE's group sizes for ``model`` at ``target`` tokens (see the module docstring); returns every
    measurement, the chosen ``groups``, ``window`` and the ``python`` line. With ``out``, writes calibrate.json
    and calibrate.png there."""
    started = time.perf_counter()
    check(target, groups=groups, window=window, tune=tune)(tokenizer, model)
    fixed = plan(model, target, groups=groups, window=window, tune=min(tune, 1) if quick else tune)
    retrieval.retrieval_cells("passkey", [target], depths, 1)  # checks the depths
    trained = archs.trained_context(model.config)
    use = frequency_use(model, tokenizer, min(trained, PROBE_TOKENS))
    share = use.reshape(fixed["groups"], -1).sum(axis=1) / use.sum()  # (groups,)
    order = [int(g) for g in np.argsort(-share, kind="stable")][: fixed["tune"]]
    start = fixed["start_group"]
    tried = list(dict.fromkeys(max(1, int(start * step)) for step in (QUICK_STEPS if quick else STEPS)))
    best = [start] * fixed["groups"]
    measured: dict[tuple, dict] = {}
    bar = tqdm(total=1 + len(order) * len(tried), desc="dpe settings", disable=not progress)

    def measure(sizes):
        if tuple(sizes) not in measured:
            measured[tuple(sizes)] = score(model, tokenizer, target, fixed["window"], sizes, depths, seed)
        bar.update(1)
        return measured[tuple(sizes)]

    best_score = measure(best)
    for group in order:
        for size in tried:
            candidate = best[:group] + [size] + best[group + 1 :]
            result = measure(candidate)
            if result["objective"] > best_score["objective"]:
                best, best_score = candidate, result
    bar.close()
    result = {
        "scheme": "dpe", "model": getattr(model.config, "_name_or_path", ""), "length": target, "trained": trained,
        **fixed, "depths": [float(d) for d in depths], "seed": seed, "quick": quick, "frequency_use": use.tolist(),
        "group_use_share": share.tolist(), "search_order": order, "sizes_tried": tried,
        "objective": "mean log-probability per token of the passkey's answer over the depths (higher is better)",
        "cells": list(measured.values()), "best": best_score, "python": python_line(fixed["window"], best),
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    if out is not None:
        write(result, Path(out))
    return result


def write(result: dict, out: Path) -> None:
    """calibrate.json and calibrate.png (frequency use per plane by group; the objective of every setting)."""
    from ..report import figure

    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(result, indent=1))
    use, count = np.array(result["frequency_use"]), result["groups"]
    colours = [f"C{plane * count // len(use) % 10}" for plane in range(len(use))]
    with figure(out / "calibrate.png", 1, 2, size=(12, 4.2)) as (_, axes):
        left, right = axes[0]
        left.bar(range(len(use)), use, color=colours)
        left.set(xlabel="rotary plane (high -> low frequency), coloured by group", ylabel="mean |q| x |k|",
                 title=f"frequency use (groups searched, most used first: {result['search_order']})")  # fmt: skip
        cells = result["cells"]
        values = [c["objective"] for c in cells]
        labels = [",".join(map(str, c["groups"])) for c in cells]
        chosen = ["C3" if c["groups"] == result["best"]["groups"] else "C0" for c in cells]
        right.scatter(values, range(len(cells)), color=chosen, zorder=3)  # dots: the axis spans the values only
        right.set_yticks(range(len(cells)), labels, fontsize=7)
        right.invert_yaxis()
        right.set(xlabel="mean answer log-probability per token (higher is better)",
                  title=f"passkey at {format_length(result['length'])}, window {result['window']} (red: chosen)")  # fmt: skip
        for ax in (left, right):
            ax.grid(alpha=0.3)


def summary(result: dict) -> str:
    """What the CLI prints: the settings measured, the choice and its line of Python."""
    lines = [f"dpe at {format_length(result['length'])} (trained {result['trained']}), window {result['window']}, "
             f"{result['groups']} groups of {result['planes'] // result['groups']} planes; objective: "
             f"{result['objective']}"]  # fmt: skip
    for cell in result["cells"]:
        mark = "  <- chosen" if cell["groups"] == result["best"]["groups"] else ""
        lines.append(f"  groups={cell['groups']}: {cell['objective']:.3f} nats/token, {cell['hits']}/{cell['trials']} "
                     f"exact{mark}")  # fmt: skip
    lines += [f"took {result['seconds'] / 60:.1f} minutes", "", result["python"]]
    return "\n".join(lines)

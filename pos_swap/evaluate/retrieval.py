"""Passkey and multi-key retrieval: a needle hidden at a chosen depth of a long haystack, answered by greedy
decoding with the KV cache (so the evaluation itself exercises cache consistency).

* ``passkey``: the Landmark Attention / YaRN protocol: repeated filler, "The pass key is NNNNN. Remember it.
  NNNNN is the pass key." at the chosen depth, then "What is the pass key? The pass key is".
* ``multikey``: RULER's niah_multikey: several "One of the special magic numbers for KEY is: VALUE." needles in
  the same filler, one of them asked for (the asked needle sits at the chosen depth, the others at random depths).

Prompts are assembled from token ids, so a prompt has exactly the requested length (up to one filler sentence).
Every trial's randomness comes from a generator seeded with (seed, task, length, depth, trial): recorded, and
the same on every run.

Each trial gives an exact match (greedy decoding through the cache) and a continuous score, the log-probability
of the answer's tokens given the prompt by teacher forcing through the same cache (LongRoPE2's "needle-driven
perplexity"). Prompts share their head and filler up to their first needle, so for a causal-consistent model
(:func:`pos_swap.engine.causal_consistent`) a sweep keeps one cache, runs the trials deepest needle first and crops
the cache back to each prompt's shared prefix instead of prefilling it again. Accuracy comes with a Wilson 95%
interval (:func:`wilson_interval`).
"""

import math
import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..archs import CACHE_ARGUMENT
from ..errors import PosSwapError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_TASK = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there."
MULTIKEY_TASK = "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards."
ADJECTIVES = ("amber", "brave", "calm", "daring", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "keen",
              "lucky", "mellow", "nimble", "odd", "proud", "quiet", "rapid", "shy", "tidy")  # fmt: skip
NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tulip")  # fmt: skip


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%


@dataclass
class Needle:
    """A haystack prompt: its token ids, the expected answer, what was hidden and where the first needle starts
    (the tokens before it are head and filler, shared with every other prompt)."""

    ids: list[int]
    answer: str
    depth: float
    details: dict
    needle_at: int = 0


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a success rate: center (p + z^2/2n) / (1 + z^2/n), half-width
    z / (1 + z^2/n) * sqrt(p(1 - p)/n + z^2/4n^2). Unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not
    empty at 0/n or n/n."""
    if trials < 1:
        raise PosSwapError(f"An interval needs at least one trial; got {trials}.")
    p, n = successes / trials, trials
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _rng(seed: int, task: str, length: int, depth: float, trial: int) -> random.Random:
    return random.Random(f"{seed}/{task}/{length}/{depth}/{trial}")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _haystack(tokenizer, length: int, head: str, needles: list[tuple[float, str]], question: str) -> tuple[list[int], int]:
    """Token ids: ``head``, filler up to ``length`` tokens in all, each needle ``(depth, text)`` inserted between
    filler sentences at its depth, then ``question``; and the index of the first needle's first token."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False) else []
    head_ids, question_ids = bos + _encode(tokenizer, head + "\n"), _encode(tokenizer, "\n" + question)
    needle_ids = [_encode(tokenizer, f"\n{text}\n") for _, text in needles]
    filler = _encode(tokenizer, " " + FILLER)
    fixed = len(head_ids) + len(question_ids) + sum(map(len, needle_ids))
    units = (length - fixed) // len(filler)
    if units < 1:
        raise PosSwapError(
            f"A {length}-token retrieval prompt is too short: the task, needles and question alone take {fixed} "
            f"tokens. Use lengths of at least {fixed + len(filler)} tokens."
        )
    slots = sorted((round(depth * units), index) for index, (depth, _) in enumerate(needles))
    ids, done = list(head_ids), 0
    first = len(head_ids) + slots[0][0] * len(filler)
    for slot, index in slots:
        ids += filler * (slot - done) + needle_ids[index]
        done = slot
    return ids + filler * (units - done) + question_ids, first


def passkey_prompt(tokenizer, length: int, depth: float, rng: random.Random) -> Needle:
    key = str(rng.randint(10000, 99999))
    line = f"The pass key is {key}. Remember it. {key} is the pass key."
    ids, first = _haystack(tokenizer, length, PASSKEY_TASK, [(depth, line)], "What is the pass key? The pass key is")
    return Needle(ids, key, depth, {}, first)


def multikey_prompt(tokenizer, length: int, depth: float, rng: random.Random, keys: int = 4) -> Needle:
    names = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], keys)
    values = [str(rng.randint(1000000, 9999999)) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]  # the asked needle (first) sits at ``depth``
    needles = [(d, f"One of the special magic numbers for {n} is: {v}.") for d, n, v in zip(depths, names, values)]
    question = (f"What is the special magic number for {names[0]} mentioned in the provided text? The special "
                f"magic number for {names[0]} mentioned in the provided text is")  # fmt: skip
    ids, first = _haystack(tokenizer, length, MULTIKEY_TASK, needles, question)
    return Needle(ids, values[0], depth, {"asked": names[0], "needles": dict(zip(names, values))}, first)


PROMPTS = {"passkey": passkey_prompt, "multikey": multikey_prompt}


def answer_of(text: str) -> str:
    """The first number in a model's reply ("" when there is none)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


def crop_to(cache, length: int) -> None:
    """Keep the first ``length`` positions of a transformers cache (``Cache.crop`` takes what to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def answer_tokens(tokenizer, answer: str) -> list[int]:
    """The answer as the model would continue "... The pass key is": a space, then the number."""
    return _encode(tokenizer, " " + answer)


def score(model, tokenizer, ids: list[int], answer: str, cache, max_new_tokens: int = 12) -> dict:
    """Answer the prompt ``ids`` by greedy decoding through ``cache`` (a ``DynamicCache`` holding the keys of a
    prefix of ``ids``, possibly none: only the rest is prefilled), then teacher-force the answer's tokens through
    the same cache. Returns the reply and ``answer_logprob`` (natural log-probability of the whole answer). The
    cache then holds ``ids`` and all but the last answer token."""
    from transformers import GenerationConfig

    device = model.get_input_embeddings().weight.device
    inputs = torch.tensor([ids], device=device)
    target = torch.tensor(answer_tokens(tokenizer, answer), device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=pad,
                              eos_token_id=model.generation_config.eos_token_id, output_logits=True,
                              return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config,
                             **{CACHE_ARGUMENT: cache})  # fmt: skip
        logits = out.logits[0][:1]  # (1, vocab): the prediction after the prompt
        crop_to(cache, len(ids))
        if target.numel() > 1:
            rest = model(input_ids=target[None, :-1], use_cache=True, **{CACHE_ARGUMENT: cache}).logits[0]
            logits = torch.cat([logits, rest])  # (answer tokens, vocab)
    logprob = -torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
    reply = tokenizer.decode(out.sequences[0, len(ids) :], skip_special_tokens=True)
    return {"reply": reply, "answer_logprob": logprob, "answer_tokens": target.numel()}


def reuse_plan(tokenizer, needles: list[Needle]) -> list[tuple[int, int]]:
    """``(index, kept)`` per needle in the order a reusing :func:`sweep` runs them (deepest first needle first):
    ``kept`` prompt tokens come from the cache, what the prompt shares with the previous prompt and its
    teacher-forced answer (at most all but the last token, which must run to predict the reply)."""
    steps, held = [], []
    for index in sorted(range(len(needles)), key=lambda i: -needles[i].needle_at):
        ids = needles[index].ids
        steps.append((index, min(common_prefix(held, ids), len(ids) - 1)))
        held = ids + answer_tokens(tokenizer, needles[index].answer)[:-1]
    return steps


def sweep(model, tokenizer, needles: list[Needle], *, reuse: bool, max_new_tokens: int = 12, progress: bool = True):
    """Score every needle; yields ``(index, result)`` in the order run. With ``reuse`` one cache serves them all,
    cropped to what each prompt shares with the previous one (:func:`reuse_plan`; exact for a causal-consistent
    model only); otherwise each prompt is prefilled from scratch. ``result`` adds ``prefilled`` (prompt tokens
    computed) to :func:`score`'s."""
    from transformers import DynamicCache

    steps = reuse_plan(tokenizer, needles) if reuse else [(index, 0) for index in range(len(needles))]
    cache = DynamicCache()
    for index, kept in tqdm(steps, desc="needles", disable=not progress, leave=False):
        if reuse:
            crop_to(cache, kept)
        else:
            cache = DynamicCache()
        needle = needles[index]
        result = score(model, tokenizer, needle.ids, needle.answer, cache, max_new_tokens)
        yield index, {**result, "prefilled": len(needle.ids) - kept}


def retrieval(model, tokenizer, task: str, lengths, depths=DEPTHS, *, trials: int = 1, seed: int = 0,
              reuse: bool | None = None, progress: bool = True, **prompt_kwargs) -> list[dict]:  # fmt: skip
    """Run ``task`` ("passkey" or "multikey") at every length x depth x trial; one dict per trial with
    ``correct`` (exact match of the first number of the reply), ``answer_logprob``, the reply, the hidden answer
    and the seed. ``reuse`` (default: whether the patched model is causal-consistent) shares one cache."""
    from ..engine import causal_consistent

    cells = retrieval_cells(task, lengths, depths, trials)
    needles = [needle_for(tokenizer, task, length, depth, trial, seed, **prompt_kwargs) for length, depth, trial in cells]
    reuse = causal_consistent(model) if reuse is None else reuse
    rows = [None] * len(cells)
    for index, result in sweep(model, tokenizer, needles, reuse=reuse, progress=progress):
        rows[index] = trial_row(task, *cells[index], seed, needles[index], result)
    return rows


def retrieval_cells(task: str, lengths, depths, trials: int) -> list[tuple[int, float, int]]:
    """Every ``(length, depth, trial)`` of a sweep, after checking the task and depths."""
    if task not in PROMPTS:
        raise PosSwapError(f"Unknown retrieval task '{task}'; use one of {', '.join(PROMPTS)}.")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise PosSwapError(f"Depth {depth} is outside 0..1 (0 = start of the haystack, 1 = its end).")
    if trials < 1:
        raise PosSwapError(f"--trials must be at least 1; got {trials}.")
    return [(length, depth, trial) for length in lengths for depth in depths for trial in range(trials)]


def needle_for(tokenizer, task: str, length: int, depth: float, trial: int, seed: int, **prompt_kwargs) -> Needle:
    """The prompt of one cell, from its own seeded generator."""
    return PROMPTS[task](tokenizer, length, depth, _rng(seed, task, length, depth, trial), **prompt_kwargs)


def trial_row(task: str, length: int, depth: float, trial: int, seed: int, needle: Needle, result: dict) -> dict:
    """What one trial records: the cell, the prompt's facts and :func:`sweep`'s result."""
    return {"task": task, "length": length, "prompt_tokens": len(needle.ids), "depth": depth, "trial": trial,
            "seed": seed, "answer": needle.answer, "needle_at": needle.needle_at, **result,
            "reply": result["reply"].strip(), "correct": answer_of(result["reply"]) == needle.answer,
            **needle.details}  # fmt: skip


def passkey(model, tokenizer, lengths, depths=DEPTHS, **kwargs) -> list[dict]:
    """Passkey retrieval accuracy over ``lengths`` x ``depths`` (see :func:`retrieval`)."""
    return retrieval(model, tokenizer, "passkey", lengths, depths, **kwargs)


def multikey(model, tokenizer, lengths, depths=DEPTHS, keys: int = 4, **kwargs) -> list[dict]:
    """Multi-key retrieval (RULER niah_multikey): ``keys`` needles, one asked for (see :func:`retrieval`)."""
    return retrieval(model, tokenizer, "multikey", lengths, depths, keys=keys, **kwargs)

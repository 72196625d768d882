"""Passkey and multi-key retrieval: a needle hidden at a chosen depth of a long haystack, answered by greedy
decoding with the KV cache (so the evaluation itself exercises cache consistency).

* ``passkey``: the Landmark Attention / YaRN protocol: repeated filler, "The pass key is NNNNN. Remember it.
  NNNNN is the pass key." at the chosen depth, then "What is the pass key? The pass key is".
* ``multikey``: RULER's niah_multikey: several "One of the special magic numbers for KEY is: VALUE." needles in
  the same filler, one of them asked for (the asked needle sits at the chosen depth, the others at random depths).

Prompts are assembled from token ids, so a prompt has exactly the requested length (up to one filler sentence).
Every trial's randomness comes from a generator seeded with (seed, task, length, depth, trial): recorded, and
the same on every run.
"""

import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import PosSwapError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_TASK = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there."
MULTIKEY_TASK = "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards."
ADJECTIVES = ("amber", "brave", "calm", "daring", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "keen",
              "lucky", "mellow", "nimble", "odd", "proud", "quiet", "rapid", "shy", "tidy")  # fmt: skip
NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tulip")  # fmt: skip


@dataclass
class Needle:
    """A haystack prompt: its token ids, the expected answer and what was hidden."""

    ids: list[int]
    answer: str
    depth: float
    details: dict


def _rng(seed: int, task: str, length: int, depth: float, trial: int) -> random.Random:
    return random.Random(f"{seed}/{task}/{length}/{depth}/{trial}")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _haystack(tokenizer, length: int, head: str, needles: list[tuple[float, str]], question: str) -> list[int]:
    """Token ids: ``head``, filler up to ``length`` tokens in all, each needle ``(depth, text)`` inserted between
    filler sentences at its depth, then ``question``."""
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
    for slot, index in slots:
        ids += filler * (slot - done) + needle_ids[index]
        done = slot
    return ids + filler * (units - done) + question_ids


def passkey_prompt(tokenizer, length: int, depth: float, rng: random.Random) -> Needle:
    key = str(rng.randint(10000, 99999))
    line = f"The pass key is {key}. Remember it. {key} is the pass key."
    ids = _haystack(tokenizer, length, PASSKEY_TASK, [(depth, line)], "What is the pass key? The pass key is")
    return Needle(ids, key, depth, {})


def multikey_prompt(tokenizer, length: int, depth: float, rng: random.Random, keys: int = 4) -> Needle:
    names = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], keys)
    values = [str(rng.randint(1000000, 9999999)) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]  # the asked needle (first) sits at ``depth``
    needles = [(d, f"One of the special magic numbers for {n} is: {v}.") for d, n, v in zip(depths, names, values)]
    question = (f"What is the special magic number for {names[0]} mentioned in the provided text? The special "
                f"magic number for {names[0]} mentioned in the provided text is")  # fmt: skip
    ids = _haystack(tokenizer, length, MULTIKEY_TASK, needles, question)
    return Needle(ids, values[0], depth, {"asked": names[0], "needles": dict(zip(names, values))})


PROMPTS = {"passkey": passkey_prompt, "multikey": multikey_prompt}


def answer_of(text: str) -> str:
    """The first number in a model's reply ("" when there is none)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


def ask(model, tokenizer, ids: list[int], max_new_tokens: int = 12) -> str:
    """Greedy decoding with the KV cache; returns the generated text."""
    from transformers import GenerationConfig

    device = model.get_input_embeddings().weight.device
    inputs = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=pad,
                              eos_token_id=model.generation_config.eos_token_id)  # fmt: skip
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def retrieval(model, tokenizer, task: str, lengths, depths=DEPTHS, *, trials: int = 1, seed: int = 0,
              progress: bool = True, **prompt_kwargs) -> list[dict]:  # fmt: skip
    """Run ``task`` ("passkey" or "multikey") at every length x depth x trial; one dict per trial with
    ``correct`` (exact match of the first number of the reply), the reply, the hidden answer and the seed."""
    if task not in PROMPTS:
        raise PosSwapError(f"Unknown retrieval task '{task}'; use one of {', '.join(PROMPTS)}.")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise PosSwapError(f"Depth {depth} is outside 0..1 (0 = start of the haystack, 1 = its end).")
    cells = [(length, depth, trial) for length in lengths for depth in depths for trial in range(trials)]
    rows = []
    for length, depth, trial in tqdm(cells, desc=task, disable=not progress, leave=False):
        rows.append(retrieval_trial(model, tokenizer, task, length, depth, trial, seed, **prompt_kwargs))
    return rows


def retrieval_trial(model, tokenizer, task: str, length: int, depth: float, trial: int, seed: int,
                    **prompt_kwargs) -> dict:  # fmt: skip
    """One prompt of ``task``, answered; the cell of :func:`retrieval`."""
    needle = PROMPTS[task](tokenizer, length, depth, _rng(seed, task, length, depth, trial), **prompt_kwargs)
    reply = ask(model, tokenizer, needle.ids)
    return {"task": task, "length": length, "prompt_tokens": len(needle.ids), "depth": depth, "trial": trial,
            "seed": seed, "answer": needle.answer, "reply": reply.strip(), "correct": answer_of(reply) == needle.answer,
            **needle.details}  # fmt: skip


def passkey(model, tokenizer, lengths, depths=DEPTHS, **kwargs) -> list[dict]:
    """Passkey retrieval accuracy over ``lengths`` x ``depths`` (see :func:`retrieval`)."""
    return retrieval(model, tokenizer, "passkey", lengths, depths, **kwargs)


def multikey(model, tokenizer, lengths, depths=DEPTHS, keys: int = 4, **kwargs) -> list[dict]:
    """Multi-key retrieval (RULER niah_multikey): ``keys`` needles, one asked for (see :func:`retrieval`)."""
    return retrieval(model, tokenizer, "multikey", lengths, depths, keys=keys, **kwargs)

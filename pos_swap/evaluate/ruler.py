"""lm-evaluation-harness's RULER tasks on the patched model, inside a ``pos-swap eval`` run:
``--tasks ppl,ruler:niah_single_1,niah_multikey_2`` (see docs/lm-eval.md for the same in plain lm-eval).

Each (scheme, task, length) cell runs ``--trials`` RULER samples through lm-eval's ``HFLM`` wrapped around the
patched model object itself (plain lm-eval would reload the checkpoint without the patch), with ``max_length`` set
to the length so that no prompt is cut, and RULER's tokenizer given as a folder (RULER loads it by name). The
samples are RULER's own, seeded by lm-eval, so every scheme answers the same prompts.
"""

import contextlib
import importlib.util
import tempfile
from pathlib import Path

from ..errors import PosSwapError, did_you_mean
from .retrieval import wilson_interval

PREFIX = "ruler:"  # how a RULER task is named in --tasks
# tasks whose prompts are built on this machine: no sentence splitting, no download
LOCAL = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
# tasks that download their haystack (essays, SQuAD, HotpotQA) and split it into sentences with nltk's punkt_tab
DOWNLOADING = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "niah_multivalue",
               "ruler_qa_squad", "ruler_qa_hotpot")  # fmt: skip
KNOWN = LOCAL + DOWNLOADING


def task_name(task: str) -> str | None:
    """``"ruler:niah_single_1"`` -> ``"niah_single_1"``; None for a task that is not RULER's."""
    return task[len(PREFIX) :] if task.startswith(PREFIX) else None


def normalize(tasks) -> tuple[str, ...]:
    """The --tasks items with RULER's named ``ruler:NAME``: after a ``ruler:`` item, bare RULER names belong to it
    (``ruler:niah_single_1,niah_multikey_2``); an unknown RULER name fails, listing the known ones."""
    named = []
    for task in tasks:
        name = task_name(task) if task.startswith(PREFIX) else (task if task in KNOWN else None)
        if name is None:
            named.append(task)
            continue
        if name not in KNOWN:
            raise PosSwapError(
                f"Unknown RULER task '{name}'.{did_you_mean(name, KNOWN)} Known: {', '.join(KNOWN)} (built here, "
                f"offline: {', '.join(LOCAL)})."
            )
        named.append(PREFIX + name)
    return tuple(dict.fromkeys(named))


def check_installed() -> None:
    """RULER runs through lm-eval, an optional dependency: say how to install it before any model loads."""
    missing = [module for module in ("lm_eval", "nltk", "wonderwords") if importlib.util.find_spec(module) is None]
    if missing:
        raise PosSwapError(
            f"RULER tasks need lm-evaluation-harness with its RULER extras ({', '.join(missing)} not installed): "
            f"pip install 'pos_swap[eval]'."
        )


@contextlib.contextmanager
def _punkt_for(name: str, folder: Path):
    """RULER's module downloads nltk's punkt_tab on import when it is missing, though only the tasks in
    DOWNLOADING split sentences. For a LOCAL task, an empty punkt_tab entry answers that look-up without a network
    call; a DOWNLOADING task keeps lm-eval's behaviour (it needs the network for its haystack anyway)."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        needed = False
    except LookupError:
        needed = name in LOCAL
    if not needed:
        yield
        return
    (folder / "nltk" / "tokenizers" / "punkt_tab").mkdir(parents=True)
    nltk.data.path.insert(0, str(folder / "nltk"))
    try:
        yield
    finally:
        nltk.data.path.remove(str(folder / "nltk"))


def run(model, tokenizer, name: str, length: int, samples: int, seed: int = 0) -> dict:
    """``samples`` RULER ``name`` prompts of ``length`` tokens answered by ``model`` (greedy, lm-eval's settings).
    Returns the mean score (RULER's: the share of each sample's needles found in its answer, averaged), the Wilson
    95% interval of the mean (exact for the 0/1 scores of single-answer tasks), and per sample its score, the
    needles it asked for (``targets``) and the model's answer."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp, _punkt_for(name, Path(tmp)):
        tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=length, batch_size=1)
        manager = TaskManager(metadata={"max_seq_lengths": [length], "tokenizer": str(Path(tmp) / "tokenizer")})
        results = simple_evaluate(lm, tasks=[name], task_manager=manager, limit=samples, log_samples=True,
                                  random_seed=seed, verbosity="ERROR")  # fmt: skip
    logged = results["samples"][name]
    scores = [float(sample[str(length)]) for sample in logged]
    low, high = wilson_interval(sum(scores), len(scores))
    return {"ruler_task": name, "score": sum(scores) / len(scores), "samples": len(scores), "low": low, "high": high,
            "sample_scores": scores, "targets": [sample["doc"]["outputs"] for sample in logged],
            "answers": [sample["resps"][0][0] for sample in logged]}  # fmt: skip

"""Evaluation that scales with its question (issue 20, sections 1 and 2): every scheme's causal-consistency
declaration against separate forwards, perplexity of several lengths from one forward, the position curve, Wilson
intervals, the answer's log-probability by teacher forcing, and retrieval sweeps that reuse a cached prefix."""

import dataclasses
import json
import math
import random

import pytest
import torch
import transformers as T
from transformers import DynamicCache

import pos_swap
from pos_swap import cli, engine
from pos_swap.errors import PosSwapError
from pos_swap.evaluate import ppl, retrieval, run, specs
from tests.conftest import scheme_params, tiny

# one setting per registered scheme (length-following rules both per position and whole-window), on a tiny model
# of a family it patches; trained context 32, so the windows below reach 3x beyond it
CONSISTENCY_CASES = [
    ("llama", "linear", None), ("llama", "ntk", None), ("llama", "yarn", None), ("llama", "llama3", None),
    ("llama", "dynamic", None), ("llama", "dynamic", {"factor": 2.0, "per_position": False}),
    ("llama", "dynamic-yarn", None), ("llama", "dynamic-yarn", {"per_position": False}),
    ("llama", "longrope", None), ("llama", "longrope", "whole-window"),
    ("llama", "alibi", {}), ("gpt2", "alibi", {}), ("gpt2", "sinusoidal", {}),
    ("gpt2", "learned-interpolate", {"factor": 4.0}), ("gpt2", "rope", {}),
    ("gpt2", "rope", {"scaling": "dynamic", "scaling_params": {"factor": 2.0}}),
    ("gpt2", "rope", {"scaling": "dynamic", "scaling_params": {"factor": 2.0, "per_position": False}}),
    ("llama", "nope", {}), ("llama", "cope", {"init": "normal"}),
    ("llama", "self-extend", {"window": 8, "group": 2}), ("llama", "rerope", {"window": 8, "leaky_factor": 2.0}),
    ("llama", "dual-chunk", {"chunk_size": 12, "local_window": 3}), ("llama", "sinks", {"sink_tokens": 2, "window": 6}),
    ("llama", "string", {"shift": 8, "local_window": 3}), ("llama", "p-rope", {"p": 0.5}), ("llama", "nope", {"every": 2}),
    ("llama", "dpe", {"window": 8, "groups": [1, 2, 4, 8]}),
]  # fmt: skip
LENGTHS = [24, 40, 64, 96]  # one inside the trained 32 (longrope switches factors there)


def patched(arch, scheme, params):
    model = tiny(arch)
    if params is None or params == "whole-window":
        extra = {"per_position": False} if params else {}
        params = {**scheme_params(scheme, model), **extra}
    pos_swap.patch(model, scheme, **params)
    return model


def one_forward_agrees(model, tokens, lengths=LENGTHS, atol=2e-5) -> bool:
    """Whether every window [0, L)'s losses equal the first L - 1 of one forward at the longest length."""
    longest = ppl.token_losses(model, tokens[: max(lengths)][None])
    return all(torch.allclose(ppl.token_losses(model, tokens[:length][None]), longest[: length - 1], atol=atol, rtol=0)
               for length in lengths)  # fmt: skip


def test_the_cases_cover_every_registered_scheme():
    assert {scheme for _, scheme, _ in CONSISTENCY_CASES} == set(pos_swap.list_schemes())


@pytest.mark.parametrize("arch, scheme, params", CONSISTENCY_CASES)
def test_each_scheme_declares_causal_consistency_truthfully(arch, scheme, params):
    """A scheme that declares it must give one forward's losses for every shorter window; one that does not must
    really differ (so a false declaration either way fails here)."""
    model = patched(arch, scheme, params)
    tokens = torch.randint(3, 100, (max(LENGTHS),), generator=torch.Generator().manual_seed(0))
    assert one_forward_agrees(model, tokens) == engine.causal_consistent(model)


def test_a_false_declaration_is_caught():
    """Whole-window dynamic-yarn made to claim consistency: the comparison the registry test runs finds it out."""
    model = patched("llama", "dynamic-yarn", {"per_position": False})
    tokens = torch.randint(3, 100, (max(LENGTHS),), generator=torch.Generator().manual_seed(0))
    engine.current_patch(model).scheme.causal_consistent = lambda: True
    assert engine.causal_consistent(model) and not one_forward_agrees(model, tokens)


def test_an_unpatched_length_following_rotary_is_not_consistent():
    model = tiny("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    tokens = torch.randint(3, 100, (max(LENGTHS),), generator=torch.Generator().manual_seed(0))
    assert not engine.causal_consistent(model) and not one_forward_agrees(model, tokens)
    assert engine.causal_consistent(tiny("llama"))


# -- perplexity from one forward -----------------------------------------------------------------------------------
def test_forwards_share_a_start_only_with_one_forward():
    cells = [(16, 0), (16, 1), (16, 2), (32, 0), (32, 1), (64, 0)]
    shared = ppl.forwards(cells, one_forward=True)
    assert shared == [(0, 64, [(16, 0), (32, 0), (64, 0)]), (16, 16, [(16, 1)]), (32, 32, [(16, 2), (32, 1)])]
    assert ppl.forwards(cells, one_forward=False) == [(i * n, n, [(n, i)]) for n, i in cells]


def test_perplexity_from_one_forward_equals_separate_windows(monkeypatch):
    model = tiny("llama")
    tokens = torch.randint(3, 100, (200,), generator=torch.Generator().manual_seed(1))
    separate = ppl.perplexity(model, tokens, [16, 32, 64], windows_per_length=2, one_forward=False, progress=False)
    calls = []
    real = ppl.token_losses
    monkeypatch.setattr(ppl, "token_losses", lambda m, ids, chunk=None: calls.append(ids.shape[1]) or real(m, ids, chunk))
    shared = ppl.perplexity(model, tokens, [16, 32, 64], windows_per_length=2, progress=False)
    assert sorted(calls) == [16, 32, 64, 64]  # starts 0 (16, 32, 64), 16 (16), 32 (32) and 64 (64)
    for a, b in zip(separate, shared):
        assert (a["length"], a["window"]) == (b["length"], b["window"])
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5) and a["ppl_tail"] == pytest.approx(b["ppl_tail"], rel=1e-5)


def test_position_buckets_average_the_tokens_at_those_positions():
    losses = torch.arange(1.0, 10.0)  # tokens 1..9 of a 10-token window
    assert ppl.bucket_losses(losses, 4) == [2.0, 5.5, 8.5]  # tokens 1-3, 4-7, 8-9
    assert [ppl.bucket_size(n) for n in (64, 1024, 4096, 16384, 32768)] == [8, 128, 512, 512, 1024]


# -- retrieval: intervals, the continuous score, prefix reuse ------------------------------------------------------
@pytest.mark.parametrize("successes, trials, low, high", [
    (0, 5, 0.0, 0.434482), (3, 3, 0.438503, 1.0), (1, 3, 0.061492, 0.792340), (7, 10, 0.396778, 0.892209),
    (50, 100, 0.403832, 0.596168),
])  # fmt: skip
def test_wilson_interval_matches_reference_values(successes, trials, low, high):
    """Reference values: scipy's binomtest(k, n).proportion_ci(0.95, "wilson") (statsmodels' proportion_confint
    agrees), and the interval as the roots of the quadratic that defines it."""
    assert retrieval.wilson_interval(successes, trials) == pytest.approx((low, high), abs=1e-6)
    z, n, p = 1.959963984540054, trials, successes / trials  # the textbook form: roots of |p - q| = z sqrt(q(1-q)/n)
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    roots = sorted(((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
    assert retrieval.wilson_interval(successes, trials) == pytest.approx(roots, abs=1e-12)


def test_wilson_interval_needs_a_trial():
    with pytest.raises(PosSwapError, match="at least one trial"):
        retrieval.wilson_interval(0, 0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return T.AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_lm(tokenizer, trained=128):
    """A tiny LLaMA over the real SmolLM2 vocabulary (prompts are real text), trained context ``trained``."""
    return tiny("llama", vocab_size=len(tokenizer), max_position_embeddings=trained)


def test_answer_logprob_is_teacher_forcing_of_one_forward(tokenizer):
    model = tiny_lm(tokenizer)
    needle = retrieval.passkey_prompt(tokenizer, 200, 0.5, random.Random(0))
    result = retrieval.score(model, tokenizer, needle.ids, needle.answer, DynamicCache(), max_new_tokens=4)
    answer = retrieval.answer_tokens(tokenizer, needle.answer)
    with torch.no_grad():
        logits = model(torch.tensor([needle.ids + answer]), use_cache=False).logits[0].double()
    start = len(needle.ids) - 1  # the logits that predict the answer's tokens
    expected = sum(torch.log_softmax(logits[start + i], -1)[token].item() for i, token in enumerate(answer))
    assert len(answer) > 1 and result["answer_tokens"] == len(answer)
    assert result["answer_logprob"] == pytest.approx(expected, abs=1e-4)
    greedy = torch.tensor([needle.ids])  # the reply: greedy decoding recomputed without a cache
    with torch.no_grad():
        for _ in range(4):
            greedy = torch.cat([greedy, model(greedy, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert result["reply"] == tokenizer.decode(greedy[0, len(needle.ids) :], skip_special_tokens=True)


def test_a_reusing_sweep_runs_deepest_first_and_keeps_the_shared_filler(tokenizer):
    needles = [retrieval.needle_for(tokenizer, "passkey", 300, depth, 0, seed=0) for depth in (0.5, 0.0, 1.0, 0.25)]
    steps = retrieval.reuse_plan(tokenizer, needles)
    assert [index for index, _ in steps] == [2, 0, 3, 1]  # first needles at depths 1, 0.5, 0.25, 0
    assert [kept for _, kept in steps] == [0] + [needles[index].needle_at for index, _ in steps[1:]]
    head = needles[1].needle_at  # depth 0: the needle right after the task's head
    assert all(n.ids[:head] == needles[1].ids[:head] for n in needles) and needles[2].needle_at > needles[0].needle_at > head


REUSE_CASES = [("native", {}), ("rerope", {"window": 48, "leaky_factor": 4.0}), ("dynamic-yarn", {}),
               ("sinks", {"sink_tokens": 4, "window": 100}), ("cope", {"init": "normal"})]  # fmt: skip


@pytest.mark.parametrize("scheme, params", REUSE_CASES, ids=[case[0] for case in REUSE_CASES])
def test_a_reused_prefix_equals_fresh_prefills(tokenizer, scheme, params):
    """Native, a windowed scheme (rerope) and a per-position one (dynamic-yarn), among others: trials continued
    from a cropped cache give each fresh prefill's reply and answer log-probability, for far less prefill."""
    model = tiny_lm(tokenizer)
    if scheme != "native":
        pos_swap.patch(model, scheme, **params)
    assert engine.causal_consistent(model)
    cells = [(length, depth, trial) for length in (300, 260) for depth in (0.0, 1.0) for trial in range(2)]
    needles = [retrieval.needle_for(tokenizer, "passkey", *cell, seed=0) for cell in cells]
    fresh = dict(retrieval.sweep(model, tokenizer, needles, reuse=False, max_new_tokens=3, progress=False))
    reused = dict(retrieval.sweep(model, tokenizer, needles, reuse=True, max_new_tokens=3, progress=False))
    for index in range(len(cells)):
        assert reused[index]["reply"] == fresh[index]["reply"], cells[index]
        assert reused[index]["answer_logprob"] == pytest.approx(fresh[index]["answer_logprob"], abs=1e-3), cells[index]
    assert [fresh[i]["prefilled"] for i in range(len(cells))] == [len(n.ids) for n in needles]
    kept = dict(retrieval.reuse_plan(tokenizer, needles))
    assert all(reused[i]["prefilled"] == len(needles[i].ids) - kept[i] for i in range(len(cells)))
    assert sum(r["prefilled"] for r in reused.values()) < 0.65 * sum(len(n.ids) for n in needles)


def test_a_sweep_reuses_only_for_a_causal_consistent_model(tokenizer, monkeypatch):
    model = tiny_lm(tokenizer)
    seen = []
    real = retrieval.sweep
    monkeypatch.setattr(retrieval, "sweep", lambda *a, reuse, **k: seen.append(reuse) or real(*a, reuse=reuse, **k))
    rows = pos_swap.evaluate.passkey(model, tokenizer, [300], depths=[0.0, 1.0], trials=2, progress=False)
    pos_swap.patch(model, "dynamic-yarn", per_position=False)
    pos_swap.evaluate.passkey(model, tokenizer, [300], depths=[0.0], progress=False)
    assert seen == [True, False]
    assert [(r["depth"], r["trial"]) for r in rows] == [(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)]
    assert all(r["answer_logprob"] < 0 and r["correct"] == (retrieval.answer_of(r["reply"]) == r["answer"]) for r in rows)
    with pytest.raises(PosSwapError, match="--trials must be at least 1"):
        pos_swap.evaluate.passkey(model, tokenizer, [300], trials=0)


# -- the run, its report and the command line ----------------------------------------------------------------------
def test_a_run_shares_forwards_only_where_it_may_and_says_so(tokenizer, tmp_path):
    model = tiny_lm(tokenizer)
    plan = run.Plan(schemes=specs.parse_schemes("native,dynamic-yarn:per_position=false"), lengths=[64, 256],
                    tasks=("ppl", "passkey"), retrieval_lengths=[256], depths=(0.0, 1.0), trials=2)  # fmt: skip
    done = run.evaluate(model, tokenizer, plan, out=tmp_path / "shared", progress=False)
    separate = run.evaluate(model, tokenizer, dataclasses.replace(plan, shared=False), progress=False)
    cells = {c["key"]: c for c in done.cells}
    assert cells["native|ppl|64|w0"]["forward"] == 256 and cells["native|passkey|256|d0/t0"]["shared"]
    whole = "dynamic-yarn:per_position=false"
    assert cells[f"{whole}|ppl|64|w0"]["forward"] == 64 and not cells[f"{whole}|passkey|256|d0/t0"]["shared"]
    for cell in separate.cells:  # the shared results are those of separate forwards and fresh prefills
        for key in ("ppl", "ppl_tail", "answer_logprob"):
            if key in cell:
                assert cells[cell["key"]][key] == pytest.approx(cell[key], rel=1e-4, abs=1e-3), cell["key"]
    sections = run.write_report(done)
    assert f"each window had its own forward: {whole}" in sections[0].text
    assert "one forward at the longest" in sections[0].text
    saved = json.loads((tmp_path / "shared" / "results.json").read_text())
    pooled = {r["scheme"]: r for r in saved["summary"]["passkey"]["by_length"]}
    hits = sum(c["correct"] for c in done.cells if c["scheme"] == "native" and c["task"] == "passkey")
    assert pooled["native"]["trials"] == 4 and pooled["native"]["successes"] == hits
    assert (pooled["native"]["low"], pooled["native"]["high"]) == pytest.approx(retrieval.wilson_interval(hits, 4))
    assert len(cells["native|ppl|256|w0"]["buckets"]) == 8 and len(cells["native|ppl|64|w0"]["buckets"]) == 2  # of 32
    assert (tmp_path / "shared" / "ppl_position.png").stat().st_size > 1000


def test_cli_refuses_trials_below_one_before_loading(tmp_path, capsys):
    missing = tmp_path / "no-model-here"
    argv = ["eval", str(missing), "--tasks", "passkey", "--trials", "0", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--trials must be at least 1; got 0" in err and "config" not in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_eval_end_to_end_on_the_real_smollm2(smollm2_dir, tmp_path, capsys):
    """The real checkpoint at 1k: passkey found at both depths natively, two trials each, through one cache, and
    every length's perplexity from one forward."""
    argv = ["eval", str(smollm2_dir), "--schemes", "native", "--lengths", "512,1k", "--tasks", "ppl,passkey",
            "--retrieval-lengths", "1k", "--depths", "0,1", "--trials", "2", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # the notes are wrapped to the terminal
    assert "4/4 100% [51%-100%]" in out and "one forward at the longest" in out
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    passkeys = [c for c in cells if c["task"] == "passkey"]
    assert all(c["correct"] and c["shared"] and -3 < c["answer_logprob"] < 0 for c in passkeys)
    # depth 1: the second trial continues from the first one's filler, and prefills only its needle and question
    # (a depth-0 needle shares nothing): 3 of the 4 prompts are prefilled almost whole
    deep = sorted((c for c in passkeys if c["depth"] == 1), key=lambda c: c["prefilled"])
    assert deep[0]["prefilled"] < 0.1 * deep[0]["prompt_tokens"]
    assert sum(c["prefilled"] for c in passkeys) < 0.8 * sum(c["prompt_tokens"] for c in passkeys)
    ppl_512 = next(c for c in cells if c["key"] == "native|ppl|512|w0")
    assert ppl_512["forward"] == 1024 and 5 < ppl_512["ppl"] < 30

"""pos_swap.evaluate: lengths and scheme lists, chunked perplexity against transformers' own loss, retrieval
prompts, run folders (cell by cell, resume), reports, recommend, the CLI and its errors. Tiny models carry the
real SmolLM2 tokenizer so prompts are real text; one short end-to-end run uses the real SmolLM2."""

import dataclasses
import json
import math
import random

import pytest
import torch
import transformers as T

import pos_swap
from pos_swap import cli, evaluate, registry, report
from pos_swap.errors import PosSwapError
from pos_swap.evaluate import merge, ppl, retrieval, run, specs
from tests.conftest import assert_figure, tiny


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return T.AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_lm(tokenizer, trained=128, seed=0):
    """A tiny LLaMA over the real SmolLM2 vocabulary, trained context ``trained``."""
    return tiny("llama", seed=seed, vocab_size=len(tokenizer), max_position_embeddings=trained)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- parsing -------------------------------------------------------------------------------------------------------
def test_lengths_take_k_suffixes():
    assert specs.parse_lengths("2k,8k,16k") == [2048, 8192, 16384]
    assert specs.parse_lengths("16k, 1500,0.5k,16k") == [512, 1500, 16384]
    assert specs.format_length(16384) == "16k" and specs.format_length(1500) == "1500"
    for bad in ("abc", "0", "1.5", "-2k", ""):
        with pytest.raises(PosSwapError, match="k suffix|whole number|No lengths"):
            specs.parse_lengths(bad)


def test_scheme_lists_parse_with_typed_parameters():
    parsed = specs.parse_schemes("native,dynamic-yarn,yarn:factor=4,self-extend:window=1024:group=8")
    assert [(s.label, s.name, s.params) for s in parsed] == [
        ("native", None, {}), ("dynamic-yarn", "dynamic-yarn", {}), ("yarn:factor=4", "yarn", {"factor": 4.0}),
        ("self-extend:window=1024:group=8", "self-extend", {"window": 1024, "group": 8}),
    ]  # fmt: skip
    assert specs.parse_scheme("yarn:factor=4:truncate=false").params == {"factor": 4.0, "truncate": False}
    assert specs.parse_scheme("rope:scaling_params={'factor': 2}").params == {"scaling_params": {"factor": 2}}
    assert specs.parse_scheme("longrope:long_factor=1;1.5").params == {"long_factor": [1.0, 1.5]}
    both = specs.parse_schemes("rope:scaling=yarn:scaling_params={'factor': 2, 'beta_fast': 16},longrope:long_factor=[1,2]")
    assert [s.params for s in both] == [{"scaling": "yarn", "scaling_params": {"factor": 2, "beta_fast": 16}},
                                        {"long_factor": [1.0, 2.0]}]


def test_a_recommended_setting_is_labelled_as_a_user_types_it():
    """recommend labels its candidates with specs.label: a list value reads as a user types it (no spaces, ``;``),
    so a recommend run's DPE cells and an eval run's of the same typed setting share one label and merge."""
    typed = "dpe:window=1024:groups=[4;8;8;8]"
    (candidate,) = registry.get_scheme("dpe").candidates(8192, 32768)
    assert specs.label("dpe", candidate) == typed and specs.parse_scheme(typed).params == candidate
    longrope = specs.label("longrope", {"long_factor": [1.0, 1.5]})
    assert longrope == "longrope:long_factor=[1;1.5]" and specs.parse_scheme(longrope).params == {"long_factor": [1.0, 1.5]}


@pytest.mark.parametrize(
    "text, message",
    [("yarn:factor", "Expected form"), ("yarn:factor=abc", "Expected form"), ("yarn:fctor=4", "no parameter 'fctor'"),
     ("yran", "Did you mean 'yarn'"), ("native:factor=2", "takes no parameters"), ("native,native", "twice"),
     ("", "No schemes")],
)  # fmt: skip
def test_malformed_scheme_lists_say_the_expected_form(text, message):
    with pytest.raises(PosSwapError, match=message):
        specs.parse_schemes(text)


# -- perplexity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma2"])
def test_chunked_loss_equals_transformers_loss(arch):
    """Token by token against transformers' logits (a mean would hide tokens swapped or shifted), and the mean
    against transformers' own loss."""
    model = tiny(arch)
    ids = torch.randint(3, 100, (1, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, labels=ids)
    per_token = torch.nn.functional.cross_entropy(out.logits[0, :-1].double(), ids[0, 1:], reduction="none")  # (28,)
    assert per_token.std() > 0.1  # distinct values, so an order or offset error shows
    for chunk in (1, 5, 1024):
        losses = ppl.token_losses(model, ids, chunk=chunk)
        assert losses.shape == (28,)
        torch.testing.assert_close(losses.double(), per_token, rtol=0, atol=1e-5)
        torch.testing.assert_close(losses.double().mean(), out.loss.double(), rtol=0, atol=1e-5)


def test_no_logits_beyond_a_chunk_of_positions():
    model = tiny("llama")
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-2]))
    ppl.token_losses(model, torch.randint(3, 100, (1, 30)), chunk=8)
    assert seen and max(seen) <= 8 and sum(seen) == 29


def test_window_and_tail_perplexity_follow_the_definition():
    losses = torch.rand(99, dtype=torch.float64) * 5  # 100 tokens: 99 predicted
    result = ppl.window_perplexity(losses)
    assert result["ppl"] == pytest.approx(math.exp(losses.mean().item()))
    tail = [losses[i - 1].item() for i in range(75, 100)]  # tokens 75..99, the last quarter
    assert result["tail_tokens"] == 25 and result["ppl_tail"] == pytest.approx(math.exp(sum(tail) / 25))


def test_perplexity_windows_mean_and_spread():
    model = tiny("llama")
    tokens = torch.randint(3, 100, (100,))
    rows = pos_swap.evaluate.perplexity(model, tokens, lengths=[16, 32], windows_per_length=3, progress=False)
    assert [(r["length"], r["window"]) for r in rows] == [(16, 0), (16, 1), (16, 2), (32, 0), (32, 1), (32, 2)]
    second = ppl.window_perplexity(ppl.token_losses(model, tokens[16:32][None]))["ppl"]
    assert rows[1]["ppl"] == pytest.approx(second)
    summary = ppl.summarize(rows[:3])
    values = torch.tensor([r["ppl"] for r in rows[:3]], dtype=torch.float64)
    assert summary["ppl"] == pytest.approx(values.mean().item()) and summary["ppl_std"] == pytest.approx(values.std().item())
    with pytest.raises(PosSwapError, match="holds 100 tokens"):
        pos_swap.evaluate.perplexity(model, tokens, lengths=[128], progress=False)


def test_an_encoder_has_no_perplexity():
    with pytest.raises(PosSwapError, match="no language-model head"):
        ppl.token_losses(tiny("bert"), torch.randint(3, 100, (1, 8)))


def test_memory_estimate_fails_before_loading():
    config = T.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)
    small, large = ppl.estimate_memory(config, 4096), ppl.estimate_memory(config, 2**26)
    assert small < 2 * 2**30 < large
    with pytest.raises(PosSwapError, match="GiB is free"):
        pos_swap.loading.load("offline:smollm2", longest=2**26)


# -- retrieval -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["passkey", "multikey"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompts_have_the_length_and_hide_the_needle_at_its_depth(tokenizer, task, depth):
    needle = retrieval.PROMPTS[task](tokenizer, 600, depth, random.Random(3))
    filler = len(tokenizer(" " + retrieval.FILLER, add_special_tokens=False).input_ids)
    assert 600 - filler < len(needle.ids) <= 600
    text = tokenizer.decode(needle.ids)
    assert text.count(retrieval.FILLER) >= 4
    where = text.index(needle.answer) / len(text)
    assert abs(where - depth) < 0.15, where
    assert text.rstrip().endswith("is")


def test_prompts_are_seeded_and_recorded():
    first = retrieval._rng(0, "passkey", 600, 0.5, 1).random()
    assert first == retrieval._rng(0, "passkey", 600, 0.5, 1).random() != retrieval._rng(1, "passkey", 600, 0.5, 1).random()


def test_answers_are_read_from_the_first_number():
    assert retrieval.answer_of(" 12345. The grass") == "12345"
    assert retrieval.answer_of(": 7654321.\n42") == "7654321"
    assert retrieval.answer_of("no idea") == ""


def test_retrieval_scores_exact_matches(tokenizer, monkeypatch):
    model = tiny_lm(tokenizer)
    reply = {"reply": "", "answer_logprob": -1.0, "answer_tokens": 2}
    monkeypatch.setattr(retrieval, "score", lambda m, t, ids, answer, cache, max_new_tokens=12: reply)
    rows = pos_swap.evaluate.passkey(model, tokenizer, [300], depths=[0.0, 1.0], trials=2, progress=False)
    assert len(rows) == 4 and not any(r["correct"] for r in rows)
    monkeypatch.setattr(retrieval, "score", lambda m, t, ids, answer, cache, max_new_tokens=12:
                        {**reply, "reply": f" {answer}. The grass"})  # fmt: skip
    rows = pos_swap.evaluate.passkey(model, tokenizer, [300], depths=[0.0, 1.0], trials=2, progress=False)
    assert all(r["correct"] for r in rows) and len({r["answer"] for r in rows}) == 4


def test_too_short_retrieval_length_names_the_minimum(tokenizer):
    with pytest.raises(PosSwapError, match="at least \\d+ tokens"):
        retrieval.passkey_prompt(tokenizer, 40, 0.5, random.Random(0))
    with pytest.raises(PosSwapError, match="outside 0..1"):
        pos_swap.evaluate.passkey(tiny_lm(tokenizer), tokenizer, [300], depths=[1.5])


# -- runs, reports, resume -----------------------------------------------------------------------------------------
def small_plan(**overrides):
    settings = dict(schemes=specs.parse_schemes("native,dynamic-yarn,yarn:factor=4"), lengths=[64, 256],
                    tasks=("ppl", "passkey", "multikey"), retrieval_lengths=[256], depths=(0.0, 1.0), windows=2)  # fmt: skip
    return run.Plan(**{**settings, **overrides})


def test_a_run_writes_every_cell_plots_and_report(tokenizer, tmp_path):
    model = tiny_lm(tokenizer)
    plan = small_plan()
    done = run.evaluate(model, tokenizer, plan, out=tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(saved["cells"]) == len(list(plan.cells())) == 3 * (2 * 2 + 2 + 2)
    assert saved["meta"]["text"] == "pydoc_data.topics" and saved["meta"]["trained_context"] == 128
    cell = next(c for c in saved["cells"] if c["scheme"] == "yarn:factor=4" and c["task"] == "ppl")
    assert cell["patch"]["scheme"] == "yarn" and cell["patch"]["params"]["factor"] == 4.0 and "seed" in cell
    assert pos_swap.describe(model) is None  # the model is left as it was
    # the native cell is the plain model's perplexity on the first window
    tokens, _ = run.text_tokens(tokenizer)
    native = next(c for c in saved["cells"] if c["key"] == "native|ppl|256|w1")
    assert native["ppl"] == pytest.approx(ppl.window_perplexity(ppl.token_losses(model, tokens[256:512][None]))["ppl"])
    sections = run.write_report(done)
    for name in ("ppl_position.png", "ppl_position_relative.png", "passkey.png", "passkey_logprob.png", "multikey.png"):
        assert_figure(tmp_path / "run" / name)
    assert "<img" in (tmp_path / "run" / "report.html").read_text()
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "dynamic-yarn" in html
    assert [s.heading for s in sections][:2] == ["Last-quarter perplexity", "Whole-window perplexity"]
    assert all(c["seconds"] >= 0 for c in saved["cells"]) and "Wall time (minutes:seconds)" in [s.heading for s in sections]
    assert [row["scheme"] for row in json.loads((tmp_path / "run" / "results.json").read_text())["summary"]["minutes"]] \
        == ["native", "dynamic-yarn", "yarn:factor=4"]


def test_cost_table_sums_minutes_per_scheme_and_task():
    cells = [{"scheme": "a", "task": "ppl", "seconds": 60.0}, {"scheme": "a", "task": "passkey", "seconds": 30.0},
             {"scheme": "a", "task": "passkey", "seconds": 90.0}, {"scheme": "b", "task": "ppl", "seconds": 6.0},
             {"scheme": "b", "task": "ppl", "unmeasured": "too long"}, {"scheme": "c", "task": "ppl"}]
    assert run.cost_table(cells) == [{"scheme": "a", "ppl": 1.0, "passkey": 2.0, "total": 3.0},
                                     {"scheme": "b", "ppl": 0.1, "passkey": 0.0, "total": 0.1}]
    assert [run.clock_time(m) for m in (0.1, 2.0, 12.0833, 59.999)] == ["0:06", "2:00", "12:05", "60:00"]


def test_relative_curves_divide_by_the_best_scheme_in_each_bucket():
    curves = {"a": ([1, 2, 3], [10.0, 4.0, 9.0]), "b": ([1, 2, 3], [5.0, 8.0, 9.0])}
    relative = run.relative_curves(curves)
    assert relative["a"] == ([1, 2, 3], [2.0, 1.0, 1.0]) and relative["b"] == ([1, 2, 3], [1.0, 2.0, 1.0])


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_where_it_stopped(tokenizer, tmp_path, monkeypatch):
    model = tiny_lm(tokenizer)
    plan = small_plan(tasks=("ppl",))
    calls, fail_at = [], [5]
    real = run.token_losses

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at[0]:
            fail_at[0] = None
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "token_losses", flaky)
    with pytest.raises(Interrupted):
        run.evaluate(model, tokenizer, plan, out=tmp_path, progress=False)
    # a scheme's windows take 3 forwards (starts 0, 64 and 256); the 5th call is the second scheme's second
    assert len(json.loads((tmp_path / "results.json").read_text())["cells"]) == 4 + 2
    with pytest.raises(PosSwapError, match="--resume"):
        run.evaluate(model, tokenizer, plan, out=tmp_path, progress=False)
    calls.clear()
    resumed = run.evaluate(model, tokenizer, plan, out=tmp_path, resume=True, progress=False)
    assert len(calls) == 2 + 3 and len(resumed.cells) == 12
    fresh = run.evaluate(model, tokenizer, plan, out=None, progress=False)
    assert {c["key"]: c["ppl"] for c in resumed.cells} == pytest.approx({c["key"]: c["ppl"] for c in fresh.cells})
    with pytest.raises(PosSwapError, match="other settings \\(lengths"):
        run.evaluate(model, tokenizer, small_plan(tasks=("ppl",), lengths=[64]), out=tmp_path, resume=True)
    # a resumed sweep may add a scheme: only its cells are measured, the others are kept
    calls.clear()
    wider = small_plan(tasks=("ppl",), schemes=specs.parse_schemes("native,dynamic-yarn,yarn:factor=4,linear:factor=2"))
    extended = run.evaluate(model, tokenizer, wider, out=tmp_path, resume=True, progress=False)
    assert len(calls) == 3 and len(extended.cells) == 16
    assert extended.meta["schemes"] == ["native", "dynamic-yarn", "yarn:factor=4", "linear:factor=2"]
    narrower = run.evaluate(model, tokenizer, small_plan(tasks=("ppl",), schemes=specs.parse_schemes("native")),
                            out=tmp_path, resume=True, progress=False)  # fmt: skip
    assert len(narrower.cells) == 16 and narrower.meta["schemes"][-1] == "linear:factor=2"


def test_merged_runs_equal_one_run_that_measured_everything(tokenizer, tmp_path):
    """A sweep split by scheme and by depth, merged, gives the cells and tables of the whole sweep run at once."""
    model = tiny_lm(tokenizer)
    parts = {"b": small_plan(schemes=specs.parse_schemes("native,dynamic-yarn"), depths=(1.0,), tasks=("passkey", "multikey")),
             "a": small_plan(schemes=specs.parse_schemes("native,dynamic-yarn"), depths=(0.0,)),
             "c": small_plan(schemes=specs.parse_schemes("yarn:factor=4"), lengths=[256, 64])}  # fmt: skip
    for name, plan in parts.items():
        run.evaluate(model, tokenizer, plan, out=tmp_path / name, progress=False)
    whole = run.evaluate(model, tokenizer, small_plan(lengths=[256]), progress=False)
    merged = evaluate.merge_runs([tmp_path / name for name in parts], tmp_path / "all")
    measured = [merge._measured(c) for c in merged.cells]
    assert len(measured) == len(whole.cells) + 6  # and the 64-token windows (two each) of runs a and c
    by_key = {c["key"]: c for c in measured}
    assert all(merge.agree(by_key[c["key"]], merge._measured(c)) for c in whole.cells)
    assert merged.meta["depths"] == [0.0, 1.0] and merged.meta["lengths"] == [64, 256]
    assert merged.meta["schemes"] == ["native", "dynamic-yarn", "yarn:factor=4"]
    sections = run.write_report(merged)
    expected = run.accuracy_table(whole.cells, "passkey", by=("scheme", "length"))
    saved = json.loads((tmp_path / "all" / "results.json").read_text())
    assert saved["summary"]["passkey"]["by_length"] == pytest.approx(expected)
    assert len(saved["cells"]) == len(measured) and "passkey retrieval accuracy" in [s.heading for s in sections]
    assert_figure(tmp_path / "all" / "passkey.png")


def test_merge_refuses_runs_that_do_not_combine(tokenizer, tmp_path):
    model = tiny_lm(tokenizer)
    plan = small_plan(schemes=specs.parse_schemes("native"), tasks=("passkey",), depths=(0.0,))
    for name, seed in (("a", 0), ("b", 0), ("seed1", 1)):
        run.evaluate(model, tokenizer, dataclasses.replace(plan, seed=seed), out=tmp_path / name, progress=False)
    folders = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(PosSwapError, match="another seed .*same model, text and --seed"):
        evaluate.merge_runs([tmp_path / "a", tmp_path / "seed1"], tmp_path / "out")
    with pytest.raises(PosSwapError, match="is one of the runs being merged"):
        evaluate.merge_runs(folders, tmp_path / "a")
    with pytest.raises(PosSwapError, match="at least two different run folders"):
        evaluate.merge_runs([tmp_path / "a", tmp_path / "a"], tmp_path / "out")
    with pytest.raises(PosSwapError, match="holds no pos_swap run"):
        evaluate.merge_runs([tmp_path / "a", tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "results.json").write_text(json.dumps({"kind": "probe", "meta": {}, "cells": []}))
    with pytest.raises(PosSwapError, match="holds a pos_swap probe run, not an eval run"):
        evaluate.merge_runs([tmp_path / "a", tmp_path / "probe"], tmp_path / "out")
    # the same cell measured twice: kept once when the two agree, refused when they differ
    assert len(evaluate.merge_runs(folders, tmp_path / "same").cells) == 1
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    saved["cells"][0]["answer_logprob"] += 1.0
    (tmp_path / "b" / "results.json").write_text(json.dumps(saved))
    with pytest.raises(PosSwapError, match="Cell 'native|passkey|256|d0/t0' was measured in .* different results"):
        evaluate.merge_runs(folders, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(PosSwapError, match="already holds a pos_swap eval run.*--overwrite"):
        evaluate.merge_runs([tmp_path / "a", tmp_path / "seed1"], tmp_path / "same")


def test_merge_agreement_is_to_float32_rounding():
    assert merge.agree({"ppl": 10.0, "buckets": [1.0, float("nan")]}, {"ppl": 10.0001, "buckets": [1.0, float("nan")]})
    assert not merge.agree({"ppl": 10.0}, {"ppl": 10.01}) and not merge.agree([1.0], [1.0, 2.0])
    assert not merge.agree({"answer": "123"}, {"answer": "124"}) and not merge.agree(1.0, "1.0")


def test_cli_merge(tiny_dir, tmp_path, capsys):
    common = ["eval", str(tiny_dir), "--lengths", "256", "--tasks", "passkey", "--depths", "0,1"]
    assert cli.main(common + ["--schemes", "native", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(common + ["--schemes", "dynamic-yarn", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert cli.main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    out = capsys.readouterr().out
    assert "passkey retrieval accuracy" in out and "(4 cells)" in out and "dynamic-yarn" in out
    assert "2 runs merged" in (tmp_path / "ab" / "report.html").read_text()
    assert cli.main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 2
    assert "Pass --overwrite to replace it" in capsys.readouterr().err
    assert cli.main(["merge", str(tmp_path / "a"), "--out", str(tmp_path / "x")]) == 2
    assert "at least two different run folders" in capsys.readouterr().err


def test_output_folder_is_never_overwritten_by_accident(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"kind": "probe", "meta": {}, "cells": [1]}))
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(PosSwapError, match="already holds a pos_swap probe run"):
        report.RunFolder(tmp_path, kind="eval", meta={})
    assert (tmp_path / "results.json").read_text() == before
    with pytest.raises(PosSwapError, match="is a file"):
        report.check_output(tmp_path / "results.json")
    assert report.RunFolder(tmp_path, kind="eval", meta={}, overwrite=True).cells == []


def test_lengths_beyond_the_text_and_empty_texts_are_refused(tokenizer, tmp_path):
    model = tiny_lm(tokenizer)
    (tmp_path / "short.txt").write_text("just a few words here")
    with pytest.raises(PosSwapError, match="holds \\d+ tokens.*--text FILE"):
        run.evaluate(model, tokenizer, small_plan(tasks=("ppl",)), text=tmp_path / "short.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(PosSwapError, match="is empty"):
        run.evaluate(model, tokenizer, small_plan(), text=tmp_path / "empty.txt")
    with pytest.raises(PosSwapError, match="does not exist"):
        run.evaluate(model, tokenizer, small_plan(), text=tmp_path / "missing.txt")
    with pytest.raises(PosSwapError, match="Unknown task"):
        small_plan(tasks=("ppl", "needle"))


def test_ruler_tasks_are_named_and_checked_before_any_model():
    """After a ``ruler:`` item, bare RULER names belong to it; an unknown RULER name lists the known ones."""
    plan = small_plan(tasks=("ppl", "ruler:niah_single_1", "niah_multikey_2", "ruler:niah_single_1"))
    assert plan.tasks == ("ppl", "ruler:niah_single_1", "ruler:niah_multikey_2")
    ruler_cells = [(spec.label, task, length, index) for spec, task, length, index in plan.cells() if task != "ppl"]
    assert ruler_cells == [(scheme, task, 256, 0) for scheme in ("native", "dynamic-yarn", "yarn:factor=4")
                           for task in ("ruler:niah_single_1", "ruler:niah_multikey_2")]  # one cell per length
    with pytest.raises(PosSwapError, match="Unknown RULER task 'niah_singel_1'. Did you mean 'niah_single_1'.*ruler_vt"):
        small_plan(tasks=("ruler:niah_singel_1",))


# -- the command line ----------------------------------------------------------------------------------------------
def test_cli_eval_resume_and_errors(tiny_dir, tmp_path, capsys):
    argv = ["eval", str(tiny_dir), "--schemes", "native,dynamic-yarn", "--lengths", "64,256", "--tasks", "ppl,passkey",
            "--retrieval-lengths", "256", "--depths", "0,1", "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Last-quarter perplexity" in out and "passkey retrieval accuracy" in out and "report.html" in out
    assert cli.main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert cli.main(argv + ["--resume"]) == 0
    assert cli.main(["eval", str(tiny_dir), "--schemes", "yarn:factr=4", "--out", str(tmp_path / "x")]) == 2
    assert "no parameter 'factr'" in capsys.readouterr().err
    assert cli.main(["eval", str(tiny_dir), "--lengths", "1M", "--out", str(tmp_path / "y")]) == 2
    assert "k suffix" in capsys.readouterr().err


def test_cli_folder_without_tokenizer_is_refused(tmp_path, capsys):
    tiny("llama").save_pretrained(tmp_path)
    assert cli.main(["eval", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err

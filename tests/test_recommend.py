"""recommend (a grid from every training-free scheme's own rule, ranked by an objective that weighs retrieval), the
teacher-forced answer loss, and the evaluation's bad-input and run-folder bugs (issue 'Truth and shape'). Tiny
models carry the real SmolLM2 tokenizer, so prompts are real text."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch
import transformers as T

import pos_swap
from pos_swap import archs, cli, engine, registry, report
from pos_swap.errors import PosSwapError
from pos_swap.evaluate import choose, demo, ppl, retrieval, run, specs
from tests.conftest import tiny


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return T.AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_lm(tokenizer, trained=128, arch="llama", **overrides):
    """A tiny causal LM over the real SmolLM2 vocabulary, sensitive to positions (initializer_range 0.1)."""
    if arch == "gpt2":
        return tiny("gpt2", vocab_size=len(tokenizer), n_positions=trained, **overrides)
    return tiny(arch, vocab_size=len(tokenizer), max_position_embeddings=trained, initializer_range=0.1, **overrides)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def no_weights(monkeypatch):
    """Make loading weights fail loudly: a check that must run before loading passes only if it stops the run."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad input was refused")

    monkeypatch.setattr(engine, "from_pretrained", refuse)


# -- bad input: lengths, depths, windows, schemes, tolerance, objective ------------------------------------------
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "infk", "nank", "1", "0", "2.5", "abc", ""])
def test_lengths_that_are_not_whole_token_counts_are_refused(text):
    with pytest.raises(PosSwapError, match="ength"):
        specs.parse_length(text)


@pytest.mark.parametrize("text", ["a", "", "nan", "1.5", "-0.5", "0,,1", "inf"])
def test_depths_outside_zero_to_one_are_refused(text):
    with pytest.raises(PosSwapError, match="depth"):
        specs.parse_depths(text)
    assert specs.parse_depths("0,0.5,1") == (0.0, 0.5, 1.0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--depths", "nan"], "needle depth 'nan'"),
        (["--depths", "1.5"], "needle depth '1.5'"),
        (["--depths", ""], "needle depth ''"),
        (["--lengths", "nan"], "Cannot read length 'nan'"),
        (["--lengths", "infk"], "Cannot read length 'infk'"),
        (["--lengths", "1"], ">= 2"),
        (["--lengths", "64", "--windows", "5000"], "5000 windows of 64 tokens need 320000"),
        (["--schemes", "native,yarn:factor=nan"], "must be finite"),
        (["--schemes", "native,self-extend:window=30:group=4"], "divisible by the group"),
    ],
)  # fmt: skip
def test_cli_eval_refuses_bad_input_before_loading(tiny_dir, tmp_path, capsys, no_weights, extra, message):
    argv = ["eval", str(tiny_dir), "--tasks", "ppl,passkey", "--lengths", "64,256", "--retrieval-lengths", "256",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_every_scheme_is_validated_before_the_first_cell(tokenizer, tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(run, "token_losses", lambda *args, **kwargs: measured.append(1))
    plan = run.Plan(schemes=specs.parse_schemes("native,yarn:factor=nan"), lengths=[64])
    with pytest.raises(PosSwapError, match="'factor' of scheme 'yarn' must be finite"):
        run.evaluate(tiny_lm(tokenizer), tokenizer, plan, out=tmp_path, progress=False)
    assert not measured and not (tmp_path / "results.json").exists()  # not even native ran


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tolerance", "nan"], "--tolerance must be a finite number >= 0"),
        (["--tolerance", "-0.1"], "--tolerance must be a finite number >= 0"),
        (["--objective", "retreival"], "Did you mean 'retrieval'?"),
        (["--length", "nan"], "Cannot read length"),
        (["--schemes", "rerope,slef-extend"], "Did you mean 'self-extend'?"),
        (["--schemes", "rerope,alibi"], "No training-free setting of alibi applies to a rotary model"),
    ],
)  # fmt: skip
def test_cli_recommend_refuses_bad_input_before_loading(tiny_dir, capsys, no_weights, extra, message):
    assert cli.main(["recommend", str(tiny_dir), "--length", "0.5k", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# -- run folders ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\udcff"])
def test_a_corrupt_or_foreign_results_file_is_a_clear_error(tmp_path, content):
    (tmp_path / "results.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(PosSwapError, match="is not a pos_swap results file.*--overwrite"):
        report.RunFolder(tmp_path, kind="eval", meta={}, resume=True)
    assert (tmp_path / "results.json").read_bytes() == content.encode("utf-8", "surrogateescape")


def test_a_folder_another_process_writes_to_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pos_swap import report; "
         "report.RunFolder(sys.argv[1], kind='eval', meta={}); print('ready', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(PosSwapError, match="Another pos_swap run is writing to"):
            report.RunFolder(tmp_path, kind="eval", meta={}, overwrite=True)
    finally:
        holder.kill()
        holder.wait()
    assert report.RunFolder(tmp_path, kind="eval", meta={"n": 1}, overwrite=True).cells == []  # released on exit
    assert not list(tmp_path.glob("*.tmp"))  # temporary files are renamed into place or removed


# -- native means the model without a patch ------------------------------------------------------------------------
def test_native_is_the_model_without_the_patch_it_was_loaded_with(tokenizer, tmp_path):
    model = tiny_lm(tokenizer)
    tokens, _ = run.text_tokens(tokenizer)
    plain = ppl.window_perplexity(ppl.token_losses(model, tokens[:256][None]))["ppl"]
    pos_swap.patch(model, "yarn", factor=4.0)
    patched = ppl.window_perplexity(ppl.token_losses(model, tokens[:256][None]))["ppl"]
    assert abs(patched / plain - 1) > 1e-3  # the patch matters on this model
    plan = run.Plan(schemes=specs.parse_schemes("saved,native,dynamic:factor=2"), lengths=[256])
    cells = {c["scheme"]: c for c in run.evaluate(model, tokenizer, plan, progress=False).cells}
    assert cells["native"]["ppl"] == pytest.approx(plain, rel=1e-6) and cells["native"]["patch"] is None
    assert cells["saved"]["ppl"] == pytest.approx(patched, rel=1e-6) and cells["saved"]["patch"]["scheme"] == "yarn"
    assert cells["dynamic:factor=2"]["patch"]["scheme"] == "dynamic"  # no "pass replace=True"
    assert pos_swap.describe(model)["params"]["factor"] == 4.0  # the model keeps its patch
    with pytest.raises(PosSwapError, match="carries none"):
        run.evaluate(tiny_lm(tokenizer), tokenizer, plan, progress=False)


def test_a_learned_table_beyond_its_rows_is_a_cell_that_says_why(tokenizer, tmp_path):
    model = tiny_lm(tokenizer, trained=256, arch="gpt2")
    plan = run.Plan(schemes=specs.parse_schemes("native,alibi"), lengths=[128, 512], tasks=("ppl", "passkey"),
                    retrieval_lengths=[512], depths=(0.5,))  # fmt: skip
    done = run.evaluate(model, tokenizer, plan, out=tmp_path, progress=False)
    cells = {c["key"]: c for c in done.cells}
    assert "256 positions" in cells["native|ppl|512|w0"]["unmeasured"]
    assert "256 positions" in cells["native|passkey|512|d0.5/t0"]["unmeasured"]
    assert math.isfinite(cells["native|ppl|128|w0"]["ppl"]) and math.isfinite(cells["alibi|ppl|512|w0"]["ppl"])
    sections = run.write_report(done)
    assert sections[-1].heading == "Not measured" and "cannot run 512" in (tmp_path / "report.html").read_text()


# -- recommend -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trained, target", [(8192, 16384), (8192, 32768), (4096, 100000), (512, 32768), (256, 8192),
                                             (128, 512), (32, 8192), (32, 64)])  # fmt: skip
def test_every_setting_of_the_grid_is_valid_for_the_model(tokenizer, trained, target):
    model = tiny_lm(tokenizer, trained=trained)
    grid = choose.grid(trained, target)
    for spec in grid[1:]:
        registry.get_scheme(spec.name).configure(model, spec.params)  # raises on an invalid setting
        assert specs.parse_scheme(spec.label) == spec  # the label reads back as the same setting
    names = {spec.name for spec in grid}
    assert {None, "dynamic-yarn", "dynamic", "yarn", "rerope", "dual-chunk"} <= names
    assert ("self-extend" in names) == ((trained, target) != (32, 8192))  # no LongLM window of 32 reaches 8k
    leaky = next(s.params for s in grid if s.name == "rerope" and "leaky_factor" in s.params)
    assert leaky["window"] + (target - leaky["window"]) / leaky["leaky_factor"] <= trained


@pytest.mark.parametrize("trained, target", [(8192, 32768), (8192, 16384), (4096, 100000), (256, 8192), (512, 32768)])
def test_self_extend_follows_the_longlm_rule(trained, target):
    settings = registry.get_scheme("self-extend").candidates(trained, target)
    assert settings
    for setting in settings:
        window, group = setting["window"], setting["group"]
        assert window % group == 0 and 0 < window < trained and (trained - window) * group + window >= target
        assert group == 2 or (trained - window) * (group - 1) + window < target  # the smallest such group


@pytest.mark.parametrize("trained, target", [(8192, 16384), (8192, 32768), (4096, 100000), (256, 8192), (32, 64)])
def test_dpe_offers_longlm_powers_of_two_with_a_finer_high_frequency_quarter(trained, target):
    (setting,) = registry.get_scheme("dpe").candidates(trained, target)
    window, groups = setting["window"], setting["groups"]
    group = groups[-1]
    assert groups == [group // 2, group, group, group] and all(window % g == 0 for g in groups)
    assert window & (window - 1) == 0 and window < trained and (trained - window) * group + window >= target
    assert group == 2 or (trained - window) * (group // 2) + window < target  # the smallest such power of two
    assert registry.get_scheme("dpe").candidates(32, 8192) == []  # no power-of-two window of 32 tokens reaches 8k


def test_a_scheme_registered_later_joins_the_grid_through_its_candidates(monkeypatch):
    class Later(registry.Scheme):
        name, summary, families, Config = "later", "a training-free scheme added later", (archs.ROTARY,), None

        @classmethod
        def candidates(cls, trained, target):
            return [{"reach": target}, {"reach": 2 * target}]

    monkeypatch.setitem(registry.SCHEMES, "later", Later)
    assert [s.label for s in choose.grid(100, 400) if s.name == "later"] == ["later:reach=400", "later:reach=800"]
    assert [s.label for s in choose.grid(100, 400, quick=True) if s.name == "later"] == ["later:reach=400"]
    assert not [s for s in choose.grid(100, 400, family=archs.LEARNED) if s.name == "later"]


def test_a_shortlist_keeps_native_and_the_named_schemes_settings():
    full = choose.grid(100, 400)
    short = choose.grid(100, 400, only=("rerope", "self-extend"))
    assert short == [spec for spec in full if spec.name in (None, "rerope", "self-extend")]
    assert {spec.name for spec in short} == {None, "rerope", "self-extend"}
    with pytest.raises(PosSwapError, match="drop it from --schemes. Schemes with one: learned-interpolate.$"):
        choose.grid(100, 400, family=archs.LEARNED, only=("rerope",))


def rows_for(values: dict, trained=128, target=512):
    """Synthetic cells: scheme -> (ppl_tail at target, answer loss, correct, ppl at trained)."""
    cells = []
    for scheme, (tail, answer, correct, inside) in values.items():
        cells.append({"scheme": scheme, "task": "ppl", "length": target, "ppl": tail, "ppl_tail": tail})
        cells.append({"scheme": scheme, "task": "ppl", "length": trained, "ppl": inside, "ppl_tail": inside})
        cells.append({"scheme": scheme, "task": "passkey", "length": target, "depth": 0.5, "correct": correct,
                      "answer_logprob": -6 * answer, "answer_tokens": 6})  # fmt: skip
    return cells


@pytest.mark.parametrize(
    "objective, order",
    [("perplexity", ["b", "c", "a", "native", "far"]), ("retrieval", ["a", "c", "b", "native", "far"]),
     ("balanced", ["c", "a", "b", "native", "far"])],
)  # fmt: skip
def test_objectives_rank_by_their_definition(objective, order):
    # balanced sums: a ln 13 + 0.02 = 2.585, b ln 11 + 3 = 5.398, c ln 12 + 0.05 = 2.535, native ln 400 + 9
    values = {"native": (400.0, 9.0, False, 10.0), "a": (13.0, 0.02, True, 10.0), "b": (11.0, 3.0, False, 10.05),
              "c": (12.0, 0.05, True, 10.0), "far": (5.0, 0.0, True, 11.0)}  # fmt: skip
    specs_ = [specs.SchemeSpec(name, None if name == "native" else "yarn", {}) for name in values]
    ranking = choose.rank(rows_for(values), specs_, 128, 512, choose.Options(objective=objective))
    assert [r["scheme"] for r in ranking] == order  # "far" changes 10% inside the trained context: last
    expected = {"perplexity": math.log(11.0), "retrieval": 0.02, "balanced": math.log(12.0) + 0.05}[objective]
    assert ranking[0]["score"] == pytest.approx(expected)


def test_recommend_measures_the_grid_and_resumes(tokenizer, tmp_path, monkeypatch):
    model = tiny_lm(tokenizer)
    options = choose.Options(quick=True, depths=(0.25, 0.5, 0.75))
    measured = []
    real = run.trial_row

    def counted(*args, **kwargs):
        measured.append(args[:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "trial_row", counted)
    result = choose.recommend(model, tokenizer, 512, options=options, out=tmp_path, progress=False)
    labels = [spec.label for spec in choose.grid(128, 512, quick=True)]
    assert sorted(r["scheme"] for r in result["ranking"]) == sorted(labels)
    assert len(measured) == 3 * len(labels)  # three depths at the target for every setting
    best = result["ranking"][0]
    assert best["scheme"] == result["best"].label and best["keeps_native"]
    scores = [r["score"] for r in result["ranking"] if r["keeps_native"]]
    assert scores == sorted(scores)
    native = next(r for r in result["ranking"] if r["scheme"] == "native")
    assert native["inside_change"] == 0.0 and 0 <= native["passkey"] <= 1 and native["answer_loss"] > 0
    text = choose.explain(result)
    for column in choose.COLUMNS:
        assert column in text
    assert result["line"] in text
    measured.clear()
    again = choose.recommend(model, tokenizer, 512, options=options, out=tmp_path, resume=True, progress=False)
    assert not measured and [r["scheme"] for r in again["ranking"]] == [r["scheme"] for r in result["ranking"]]



def test_a_recommend_split_by_scheme_merges_and_resumes_to_the_whole_ranking(tokenizer, tmp_path, monkeypatch):
    """Two shortlists measured apart (two processes or machines), merged, then resumed with the whole shortlist:
    nothing is measured again and the ranking is the one a single run gives."""
    from pos_swap.evaluate import merge_runs

    model = tiny_lm(tokenizer)
    whole = choose.recommend(model, tokenizer, 512, progress=False,
                             options=choose.Options(quick=True, schemes=("rerope", "self-extend")))  # fmt: skip
    for name in ("rerope", "self-extend"):
        options = choose.Options(quick=True, schemes=(name,))
        choose.recommend(model, tokenizer, 512, options=options, out=tmp_path / name, progress=False)
    merge_runs([tmp_path / "self-extend", tmp_path / "rerope"], tmp_path / "both")
    monkeypatch.setattr(run, "trial_row", lambda *args, **kwargs: pytest.fail("a merged cell was measured again"))
    monkeypatch.setattr(run, "token_losses", lambda *args, **kwargs: pytest.fail("a merged cell was measured again"))
    resumed = choose.recommend(model, tokenizer, 512, out=tmp_path / "both", resume=True, progress=False,
                               options=choose.Options(quick=True, schemes=("rerope", "self-extend")))  # fmt: skip
    assert [r["scheme"] for r in resumed["ranking"]] == [r["scheme"] for r in whole["ranking"]]
    for mine, theirs in zip(resumed["ranking"], whole["ranking"]):
        assert mine["score"] == pytest.approx(theirs["score"], rel=1e-4) and mine["passkey"] == theirs["passkey"]
    saved = json.loads((tmp_path / "both" / "results.json").read_text())["meta"]
    assert len(saved["merged_from"]) == 2 and saved["schemes"][0] == "native"

def test_recommend_on_a_learned_table_ranks_native_beyond_it_last(tokenizer):
    model = tiny_lm(tokenizer, trained=256, arch="gpt2")
    result = choose.recommend(model, tokenizer, 512, options=choose.Options(quick=True), progress=False)
    assert [r["scheme"] for r in result["ranking"]] == ["learned-interpolate:factor=2", "native"]
    assert result["ranking"][-1]["passkey_hits"] == "not measured" and "not measured" in choose.explain(result)
    assert result["line"] == 'pos_swap.patch(model, "learned-interpolate", factor=2.0)'


def test_cli_recommend_prints_the_table_and_the_line(tiny_dir, tmp_path, capsys):
    out = tmp_path / "rec"
    argv = ["recommend", str(tiny_dir), "--length", "0.5k", "--quick", "--objective", "retrieval", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ranked by objective 'retrieval'" in printed and "answer_loss" in printed and "passkey_hits" in printed
    assert "use:\n    pos_swap.patch(model, " in printed or "use:\n    # no patch" in printed
    assert cli.main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert cli.main(argv + ["--resume"]) == 0 and (out / "report.html").exists()



def test_a_recommend_run_merges_with_an_eval_run_of_the_same_model(tiny_dir, tmp_path, monkeypatch):
    """Both record the model as it was named (here an offline alias), so their shared cells can be merged."""
    from pos_swap import offline

    monkeypatch.setattr(offline, "smollm2", lambda: tiny_dir)
    rec, ev = tmp_path / "rec", tmp_path / "ev"
    assert cli.main(["recommend", "offline:smollm2", "--length", "0.5k", "--quick", "--schemes", "rerope",
                     "--out", str(rec)]) == 0  # fmt: skip
    assert cli.main(["eval", "offline:smollm2", "--schemes", "native", "--tasks", "passkey", "--retrieval-lengths",
                     "0.5k", "--depths", "0.5", "--out", str(ev)]) == 0  # fmt: skip
    assert json.loads((rec / "results.json").read_text())["meta"]["model"] == "offline:smollm2"
    assert cli.main(["merge", str(rec), str(ev), "--out", str(tmp_path / "both")]) == 0
    merged = json.loads((tmp_path / "both" / "results.json").read_text())
    assert "native|passkey|512|d0.5/t0" in {cell["key"] for cell in merged["cells"]}

# -- the demo --------------------------------------------------------------------------------------------------------
def test_demo_haystack_hides_each_key_at_its_depth_in_the_text(tokenizer):
    tokens, _ = run.text_tokens(tokenizer)
    ids, mask, asked = demo.haystack(tokenizer, tokens, 600, (0.1, 0.5, 0.9))
    assert max(len(n.ids) for n in asked) == 600 and all(n.ids[: len(ids)] == ids for n in asked)
    room = len(ids) - int(mask.sum())
    for needle in asked:
        hidden = tokenizer.decode(ids[needle.needle_at : needle.needle_at + 40])
        assert f"pass key of the {needle.details['asked']} is {needle.answer}" in hidden
        text_before = int((~mask[: needle.needle_at]).sum())
        assert text_before == round(needle.depth * room)  # the text tokens before the needle: its depth
        assert tokenizer.decode(needle.ids[len(ids) :]).strip() == demo.question(needle.details["asked"])
    assert tokenizer.decode(ids[:30]) == tokenizer.decode(tokens[:30].tolist())  # the haystack is the text itself


def test_demo_measures_from_one_forward_what_separate_forwards_give(tokenizer):
    from transformers import DynamicCache

    model = tiny_lm(tokenizer)
    tokens, _ = run.text_tokens(tokenizer)
    ids, mask, asked = demo.haystack(tokenizer, tokens, 400, (0.1, 0.5, 0.9))
    cells = demo.measure(model, tokenizer, ids, mask, asked)
    losses = ppl.token_losses(model, torch.tensor([ids]))  # reference: an uncached forward
    (_, _, curve), *retrieved = cells
    assert curve["ppl"] == pytest.approx(ppl.window_perplexity(losses[~mask[1:]])["ppl"], rel=1e-6)
    assert curve["buckets"] == pytest.approx(ppl.bucket_losses(losses.masked_fill(mask[1:], math.nan), 32), nan_ok=True)
    for (task, (depth, _), row), needle in zip(retrieved, asked):
        fresh = retrieval.score(model, tokenizer, needle.ids, needle.answer, DynamicCache())  # its own prefill
        assert task == "multikey" and depth == needle.depth and row["prefilled"] == len(needle.ids) - len(ids)
        assert row["answer_logprob"] == pytest.approx(fresh["answer_logprob"], rel=1e-5)
        assert row["reply"] == fresh["reply"].strip()


@pytest.mark.slow
def test_demo_end_to_end_on_the_real_smollm2(tmp_path, monkeypatch, capsys):
    """The demo's code path on the real checkpoint with a short window (the real settings run in CI's long step)."""
    monkeypatch.setitem(demo.SETTINGS, False, dict(length=1024, depths=(0.1, 0.9)))
    done = demo.demo(tmp_path, progress=False)
    cells = {c["key"]: c for c in done.cells}
    assert len(cells) == 2 * (1 + 2)
    leaky, length = demo.SCHEMES.split(",")[1], done.cells[0]["length"]  # the haystack's length, without a question
    native = {key.split("|", 1)[1]: cell for key, cell in cells.items() if key.startswith("native|")}
    # inside its 4096-token window leaky ReRoPE is the native model: the same perplexity, answers and answer losses
    for where, cell in native.items():
        patched = cells[f"{leaky}|{where}"]
        for name in ("ppl", "answer_logprob"):
            assert (name in cell) == (name in patched) and patched.get(name) == pytest.approx(cell.get(name), rel=1e-4)
        assert patched.get("correct") == cell.get("correct")
    assert native[f"multikey|{length}|d0.9/t0"]["correct"]  # measured: SmolLM2 finds the key read last at 1k
    assert 5 < native[f"ppl|{length}|w0"]["ppl"] < 30
    html = (tmp_path / "report.html").read_text()
    assert "<table class='settings'>" in html and "why this scheme" in html and "<pre>" not in html
    assert "Last-quarter perplexity" in capsys.readouterr().out

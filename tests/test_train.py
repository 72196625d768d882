"""pos_swap.train: recovery fine-tuning with LoRA through transformers' Trainer, PoSE ids, packed data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

import pos_swap
from conftest import outputs, skip_missing, tiny
from pos_swap import train
from pos_swap.errors import PosSwapError
from pos_swap.evaluate import token_losses
from pos_swap.train import run as train_run
from pos_swap.train.lora import scheme_parameters


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train 100x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bigram_tokens(count: int = 4000, seed: int = 0) -> torch.Tensor:
    """A learnable token stream: each token follows from the previous one by a fixed permutation, 10% noise."""
    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(97, generator=generator) + 3
    noise = torch.rand(count, generator=generator) < 0.1
    random = torch.randint(3, 100, (count,), generator=generator)
    tokens = [3]
    for i in range(1, count):
        tokens.append(int(random[i]) if noise[i] else int(successor[tokens[-1] - 3]))
    return torch.tensor(tokens)


def settings(**overrides):
    base = dict(scheme="alibi", params={"trainable": True}, seq_len=16, max_steps=30, batch_size=4, learning_rate=1e-2)
    return train.Settings(**{**base, **overrides})


def cells(run):
    return {cell["key"]: cell for cell in run.cells}


# -- PoSE ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_pose_ids_follow_their_definition(chunks):
    """Chunk i holds consecutive ids shifted by u_i: u_0 = 0, u_{i-1} <= u_i <= target - length."""
    length, target = 24, 100
    generator = torch.Generator().manual_seed(0)
    last_skips = []
    for _ in range(400):
        ids = train.pose_position_ids(length, target, chunks, generator)
        skips = ids - torch.arange(length)  # u of each token's chunk
        assert ids.shape == (length,) and ids.dtype == torch.long
        assert skips[0] == 0 and (skips.diff() >= 0).all() and skips.max() <= target - length
        assert (skips.diff() > 0).sum() <= chunks - 1  # at most one new skip per chunk boundary
        last_skips.append(skips[-1].item())
    if chunks == 1:
        assert set(last_skips) == {0}
    else:  # the skips reach the whole range, so positions up to target - 1 are trained
        assert max(last_skips) == target - length and min(last_skips) < (target - length) / 4


def test_pose_examples_are_reproducible_per_index():
    sequences = bigram_tokens(64).view(4, 16)
    data = train.PackedSequences(sequences, pose_target=64, seed=3)
    assert torch.equal(data[2]["position_ids"], data[2]["position_ids"])
    assert data[2]["position_ids"].max() < 64 and torch.equal(data[2]["input_ids"], sequences[2])


def test_pose_ids_reach_the_model():
    """A RoPE-scaling patch reads PoSE's position_ids: the logits change with them."""
    model = tiny("llama")
    pos_swap.patch(model, "yarn", factor=4.0)
    ids = bigram_tokens(16)[None]
    pose = train.pose_position_ids(16, 128, 2, torch.Generator().manual_seed(1))[None]
    assert not torch.allclose(outputs(model, ids), outputs(model, ids, position_ids=pose))


# -- the run -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """GPT-2 (learned table, Conv1D) given trainable ALiBi and recovered: the run and its folder."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    model = tiny("gpt2")
    run = train.finetune(model, bigram_tokens(), settings(), out=out, progress=False)
    return run, out, model


def test_a_tiny_run_lowers_the_loss_and_writes_its_report(gpt2_run):
    run, out, _ = gpt2_run
    found = cells(run)
    losses = found["training"]["losses"]
    assert found["training"]["steps"] == 30 and len(losses) == 30
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])
    for length in (16, 32, 64):
        assert found[f"recovered|{length}"]["ppl"] < 0.8 * found[f"swapped|{length}"]["ppl"]
    assert found["before|64"]["ppl"] is None  # the native table holds 32 positions
    saved = json.loads((out / "results.json").read_text())
    assert saved["kind"] == "finetune" and saved["meta"]["scheme"] == "alibi"
    for name in ("perplexity.png", "loss.png", "report.html", "adapter/pos_swap.json", "merged/config.json"):
        assert (out / name).exists(), name
    assert "pos_swap alibi:trainable=true recovery" in (out / "report.html").read_text()  # the scheme as set


@pytest.mark.parametrize("pose", [False, True])
def test_the_perplexity_plot_marks_the_pose_target_only_when_pose_trained(tmp_path, monkeypatch, pose):
    drawn = {}
    monkeypatch.setattr(train_run.report, "line_plot", lambda path, series, **kw: drawn.setdefault(path.name, kw))
    meta = {"scheme": "yarn", "params": {"factor": 4.0}, "seq_len": 32, "pose": pose, "target_len": 128}
    cells_ = [{"stage": "recovered", "length": n, "ppl": 2.0} for n in (32, 128)]
    train_run.write_report(SimpleNamespace(path=tmp_path, meta=meta, cells=cells_))
    expected = {"training length": 32} | ({"PoSE target (positions trained)": 128} if pose else {})
    assert drawn["perplexity.png"]["marks"] == expected


def test_running_mean_is_the_mean_of_each_window():
    values = [4.0, 2.0, 6.0, 0.0, 3.0]
    assert train_run.running_mean(values, 2) == pytest.approx([3.0, 4.0, 3.0, 1.5])
    assert train_run.running_mean(values, 5) == pytest.approx([3.0])
    assert train_run.running_mean(values, 1) == pytest.approx(values)


def test_scheme_parameters_train_under_lora(gpt2_run):
    _, out, model = gpt2_run
    fresh = tiny("gpt2")
    pos_swap.patch(fresh, "alibi", trainable=True)
    initial = dict(fresh.named_parameters())
    trained = dict(pos_swap.from_pretrained(out / "merged").named_parameters())
    names = scheme_parameters(fresh)
    assert names and all(not torch.equal(trained[n], initial[n]) for n in names)


def test_adapter_and_merged_model_give_the_run_s_logits(gpt2_run):
    _, out, _ = gpt2_run
    ids = bigram_tokens(40)[None]
    adapter = train.load_adapter(out / "adapter", base_model=tiny("gpt2"))
    merged = pos_swap.from_pretrained(out / "merged").eval()
    assert pos_swap.describe(merged)["scheme"] == "alibi" == pos_swap.describe(adapter)["scheme"]
    torch.testing.assert_close(outputs(merged, ids), outputs(adapter, ids), rtol=1e-5, atol=1e-5)
    _, held_out = train.split(bigram_tokens(), 16, 64)  # the run measured the merged model on the held-out tail
    losses = torch.cat([token_losses(merged, window[None]) for window in held_out.view(2, 32)])
    assert losses.double().mean().exp().item() == pytest.approx(cells(_saved(out))["recovered|32"]["ppl"], rel=1e-5)


def test_an_adapter_loads_the_base_it_recorded_through_an_offline_alias(tmp_path, monkeypatch):
    """The record keeps the name the run was given (here offline:smollm2, pointed at a tiny GPT-2); load_adapter
    with no base_model resolves it as the CLI does."""
    base = tmp_path / "base"
    tiny("gpt2").save_pretrained(base)
    monkeypatch.setattr(pos_swap.offline, "smollm2", lambda: base)
    out = tmp_path / "run"
    train.finetune(pos_swap.from_pretrained(base), bigram_tokens(), settings(max_steps=2), out=out,
                   model_name="offline:smollm2", progress=False)  # fmt: skip
    assert json.loads((out / "adapter" / "pos_swap.json").read_text())["base_model"] == "offline:smollm2"
    adapter = train.load_adapter(out / "adapter")
    ids = bigram_tokens(30)[None]  # within the native table, for the comparison with the native model
    merged = pos_swap.from_pretrained(out / "merged")
    torch.testing.assert_close(outputs(adapter, ids), outputs(merged, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs(adapter, ids), outputs(tiny("gpt2"), ids))  # the adapter and patch are on


def test_an_adapter_without_a_recorded_base_asks_for_one(gpt2_run):
    _, out, _ = gpt2_run  # trained from an in-memory model: no name to record
    with pytest.raises(PosSwapError, match="does not name its base model; pass base_model="):
        train.load_adapter(out / "adapter")



def test_the_native_control_trains_the_same_way_without_a_swap(tmp_path):
    """``native``: LoRA on the unpatched model, measured before and after (there is no swapped stage); what it
    gains is what the text alone teaches, the baseline a recovery is read against."""
    out = tmp_path / "control"
    model = tiny("llama")
    untouched = outputs(tiny("llama"), bigram_tokens(40)[None])
    run = train.finetune(model, bigram_tokens(), settings(scheme="native", params={}), out=out, progress=False)
    found = cells(run)
    assert {key.split("|")[0] for key in found} == {"before", "training", "recovered"}
    for length in (16, 32, 64):
        assert found[f"recovered|{length}"]["ppl"] < 0.8 * found[f"before|{length}"]["ppl"]
    assert json.loads((out / "adapter" / "pos_swap.json").read_text())["patch"] is None
    merged = pos_swap.from_pretrained(out / "merged").eval()
    adapter = train.load_adapter(out / "adapter", base_model=tiny("llama"))
    assert pos_swap.describe(merged) is None and pos_swap.describe(adapter) is None
    ids = bigram_tokens(40)[None]
    torch.testing.assert_close(outputs(merged, ids), outputs(adapter, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs(merged, ids), untouched)  # trained
    assert "native fine-tuning (no swap)" in (out / "report.html").read_text()


def _benchmark(name: str):
    """A script of benchmarks/ imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved(out):
    return type("SavedRun", (), json.loads((out / "results.json").read_text()))


def test_resume_continues_with_the_same_step_optimizer_state_and_data_order(tmp_path):
    class Interrupt(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    tokens, chosen = bigram_tokens(), settings(max_steps=6, save_steps=3)
    straight = train.finetune(tiny("gpt2"), tokens, chosen, out=tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train.finetune(tiny("gpt2"), tokens, chosen, out=tmp_path / "b", progress=False, callbacks=[Interrupt()])
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["checkpoint-3"]
    resumed = train.finetune(tiny("gpt2"), tokens, chosen, out=tmp_path / "b", resume=True, progress=False)
    a, b = cells(straight)["training"], cells(resumed)["training"]
    assert b["steps"] == 6 and len(b["losses"]) == 6
    assert b["losses"] == a["losses"]  # the same batches in the same order, the same updates
    optimizers = [torch.load(tmp_path / run / "checkpoints/checkpoint-6/optimizer.pt") for run in "ab"]
    for left, right in zip(optimizers[0]["state"].values(), optimizers[1]["state"].values()):
        for key in left:
            torch.testing.assert_close(left[key], right[key], rtol=0, atol=0)
    weights = [dict(pos_swap.from_pretrained(tmp_path / run / "merged").named_parameters()) for run in "ab"]
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=0)


def test_resume_trains_further_with_more_steps(tmp_path):
    """A finished 3-step run resumed with --max-steps 6 (and other evaluation lengths, the same held-out tail) ends
    where a straight 6-step run does: the same losses and weights. Settings that change what was trained, the
    held-out tail, or fewer steps than trained are refused."""
    tokens = bigram_tokens()
    straight = train.finetune(tiny("gpt2"), tokens, settings(max_steps=6, save_steps=3), out=tmp_path / "a", progress=False)
    train.finetune(tiny("gpt2"), tokens, settings(max_steps=3), out=tmp_path / "b", progress=False)
    refusals = [(dict(max_steps=2), "trained 3 steps already; --max-steps 2"),
                (dict(max_steps=6, learning_rate=2e-2), r"other settings \(learning_rate differ"),
                (dict(max_steps=6, eval_factors=(1, 2)), r"other settings \(held_out_tokens differ")]  # fmt: skip
    for overrides, message in refusals:
        with pytest.raises(PosSwapError, match=message):
            train.finetune(tiny("gpt2"), tokens, settings(**overrides), out=tmp_path / "b", resume=True, progress=False)
    further = settings(max_steps=6, save_steps=3, eval_factors=(1, 4))  # 2x dropped, the held-out tail kept
    resumed = train.finetune(tiny("gpt2"), tokens, further, out=tmp_path / "b", resume=True, progress=False)
    a, b = cells(straight)["training"], cells(resumed)["training"]
    assert b["steps"] == 6 and b["losses"] == a["losses"]
    weights = [dict(pos_swap.from_pretrained(tmp_path / run / "merged").named_parameters()) for run in "ab"]
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=0)
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["meta"]["max_steps"] == 6 and saved["meta"]["eval_factors"] == [1, 4]
    assert sorted(c["key"] for c in saved["cells"] if "stage" in c) == sorted(
        f"{stage}|{n}" for stage in ("before", "swapped", "recovered") for n in (16, 64))


@pytest.mark.parametrize("rank", [8, 0])
def test_resuming_a_finished_run_reloads_its_weights(tmp_path, rank):
    """Resumed after its last step, a run trains no further: it reloads the checkpoint (a LoRA adapter, or without
    LoRA the whole model with its trained ALiBi slopes) and measures the same recovered model again."""
    chosen = settings(max_steps=2, lora_rank=rank)
    first = cells(train.finetune(tiny("gpt2"), bigram_tokens(), chosen, out=tmp_path, progress=False))
    again = cells(train.finetune(tiny("gpt2"), bigram_tokens(), chosen, out=tmp_path, resume=True, progress=False))
    assert again["training"]["steps"] == 2 and again["training"]["losses"] == first["training"]["losses"]
    for length in (16, 32, 64):
        assert again[f"recovered|{length}"]["ppl"] == pytest.approx(first[f"recovered|{length}"]["ppl"], rel=1e-6)
        assert again[f"recovered|{length}"]["ppl"] != pytest.approx(first[f"swapped|{length}"]["ppl"], rel=1e-4)


# -- LoRA wrapping ---------------------------------------------------------------------------------------------------
def backward(model):
    model.train()
    ids = bigram_tokens(20)[None]
    model(input_ids=ids, labels=ids).loss.backward()
    return {name for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox", "phi3"])
def test_lora_targets_come_from_the_architecture_map(arch):
    model = tiny(arch)
    pos_swap.patch(model, "cope")
    norms = pos_swap.archs.norm_names(model)
    wrapped = train.trainable(model, rank=4, alpha=8, norms=True)
    updated = backward(wrapped)
    targets = pos_swap.archs.lookup(model).lora_targets
    assert {t for t in targets if any(f"{t}.lora_A" in name for name in updated)} == set(targets)
    assert any(".pos_swap.modules_to_save." in name for name in updated)  # CoPE's tables train
    assert norms and all(any(f"{norm}.modules_to_save." in name for name in updated) for norm in norms)


def test_both_peft_orders_train_the_same_parameters():
    patched_first = tiny("llama")
    pos_swap.patch(patched_first, "alibi", trainable=True)
    first = train.trainable(patched_first, rank=4, alpha=8)
    wrapped_first = train.trainable(tiny("llama"), rank=4, alpha=8, scheme=False)
    pos_swap.patch(wrapped_first, "alibi", trainable=True)
    torch.testing.assert_close(outputs(first, bigram_tokens(20)[None]), outputs(wrapped_first, bigram_tokens(20)[None]))
    strip = lambda names: {n.replace("modules_to_save.default.", "") for n in names}  # noqa: E731
    assert strip(backward(first)) == strip(backward(wrapped_first))


def test_embeddings_and_norms_only_without_lora():
    model = tiny("llama")
    pos_swap.patch(model, "yarn", factor=2.0)
    same = train.trainable(model, rank=0, alpha=0, embeddings=True)
    assert same is model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"model.embed_tokens.weight"}


# -- bad input -------------------------------------------------------------------------------------------------------
def test_missing_and_empty_text(tmp_path):
    tokenizer = object()
    with pytest.raises(PosSwapError, match="does not exist"):
        train.load_tokens(tokenizer, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(PosSwapError, match="empty"):
        train.load_tokens(tokenizer, tmp_path / "empty.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(PosSwapError, match="holds no"):
        train.load_tokens(tokenizer, tmp_path / "folder")


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(target_len=8), "below --seq-len"), (dict(pose=True), "give --target-len"), (dict(scheme="alibii"), "alibi"),
     (dict(max_steps=0), "at least 1"), (dict(scheme="native", params={"factor": 2.0}), "takes no parameters")],
)  # fmt: skip
def test_bad_settings(overrides, message):
    with pytest.raises(PosSwapError, match=message):
        settings(**overrides)


def test_bad_runs_fail_before_anything_is_written(tmp_path):
    model, tokens = tiny("gpt2"), bigram_tokens()
    with pytest.raises(PosSwapError, match="fewer than one 16-token training sequence"):
        train.finetune(model, tokens[:64], settings(), out=tmp_path / "short")
    with pytest.raises(PosSwapError, match="nothing to train"):
        train.finetune(model, tokens, settings(params={}, train_scheme=True), out=tmp_path / "x")
    with pytest.raises(PosSwapError, match="Nothing to train"):
        train.finetune(model, tokens, settings(params={}, lora_rank=0), out=tmp_path / "y")
    assert pos_swap.describe(model) is None  # a failed run leaves the model as it was
    assert not (tmp_path / "short").exists()


def test_a_folder_holding_another_run_is_refused(gpt2_run):
    run, out, _ = gpt2_run
    before = (out / "results.json").read_text()
    with pytest.raises(PosSwapError, match="--resume to continue it, --overwrite"):
        train.finetune(tiny("gpt2"), bigram_tokens(), settings(), out=out)
    with pytest.raises(PosSwapError, match="other settings .*learning_rate"):
        train.finetune(tiny("gpt2"), bigram_tokens(), settings(learning_rate=2e-2), out=out, resume=True)
    assert (out / "results.json").read_text() == before


def test_pose_run_with_activation_checkpointing_and_no_folder():
    chosen = settings(scheme="yarn", params={"factor": 4.0}, max_steps=3, pose=True, target_len=64,
                      gradient_checkpointing=True)  # fmt: skip
    run = train.finetune(tiny("llama"), bigram_tokens(), chosen, progress=False)
    found = cells(run)
    assert found["training"]["steps"] == 3 and run.path is None
    assert {key for key in found if key.startswith("recovered")} == {"recovered|16", "recovered|32", "recovered|64"}


# -- the command line ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_tokenizer):
    """A tiny LLaMA with SmolLM2's tokenizer, saved as a model folder the CLI can load."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_cli_finetune_runs_refuses_a_used_folder_and_resumes(tiny_folder, tmp_path, capsys):
    from pos_swap.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text(pos_swap.offline.pydoc_text()[:20000])
    out = tmp_path / "run"
    argv = ["finetune", str(tiny_folder), "--scheme", "alibi", "--trainable", "true", "--text", str(text),
            "--seq-len", "32", "--max-steps", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "recovered" in printed and "load it with pos_swap.from_pretrained" in printed
    assert pos_swap.describe(pos_swap.from_pretrained(out / "merged"))["params"]["trainable"] is True
    before = (out / "results.json").read_text()
    assert main(argv) == 2 and "--resume to continue it" in capsys.readouterr().err
    assert main(argv + ["--resume", "--learning-rate", "1e-3"]) == 2 and "learning_rate" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    assert main(argv + ["--resume"]) == 0  # finished already: the checkpoint reloads, the same recovered model
    ppl = [{c["key"]: c.get("ppl") for c in json.loads(saved)["cells"]} for saved in (before, (out / "results.json").read_text())]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-5)


def test_cli_finetune_takes_the_scheme_with_its_parameters(tmp_path, capsys):
    """`--scheme alibi:trainable=true`, the form eval and recommend take, end to end on a tiny model."""
    from pos_swap.cli import main
    from test_cli_errors import byte_tokenizer

    folder, text = tmp_path / "model", tmp_path / "corpus.txt"
    tiny("llama", vocab_size=256).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    text.write_text(pos_swap.offline.pydoc_text()[:4000])
    argv = ["finetune", folder, "--scheme", "alibi:trainable=true", "--text", text, "--seq-len", "16", "--max-steps",
            "1", "--out", tmp_path / "run"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert "perplexity (alibi:trainable=true, trained at 16 tokens)" in capsys.readouterr().out
    assert pos_swap.describe(pos_swap.from_pretrained(tmp_path / "run" / "merged"))["params"]["trainable"] is True
    heldout_ppl = _benchmark("heldout_ppl")
    heldout_ppl.main([str(tmp_path / "run"), "--schemes", "native,alibi:trainable=true"])
    rows = json.loads((tmp_path / "run" / "heldout_ppl.json").read_text())["rows"]
    stages = {c["key"]: c.get("ppl") for c in json.loads((tmp_path / "run" / "results.json").read_text())["cells"]}
    for row, stage in zip(rows, ("before", "swapped")):  # the same tokens by the same rule: the run's own values
        assert [row[k] for k in ("16", "32", "64")] == pytest.approx([stages[f"{stage}|{n}"] for n in (16, 32, 64)])
    control = [a if a != "alibi:trainable=true" else "native" for a in argv[:-1]] + [tmp_path / "control"]
    assert main([str(a) for a in control]) == 0
    assert "perplexity (native, trained at 16 tokens)" in capsys.readouterr().out
    assert pos_swap.describe(pos_swap.from_pretrained(tmp_path / "control" / "merged")) is None
    assert main([str(a) for a in control[:-1] + [tmp_path / "x", "--factor", "2"]]) == 2
    assert "need --scheme NAME (not native)" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_bad_text(tiny_folder, tmp_path, capsys):
    from pos_swap.cli import main

    base = ["finetune", str(tiny_folder), "--scheme", "linear", "--factor", "2", "--out", str(tmp_path / "r")]
    assert main(base + ["--text", str(tmp_path / "nope.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("a few words only")
    assert main(base + ["--text", str(tmp_path / "short.txt"), "--seq-len", "64"]) == 2
    assert "fewer than one 64-token training sequence" in capsys.readouterr().err
    assert main(base + ["--seq-len", "64", "--pose", "--target-len", "32"]) == 2
    assert "below --seq-len" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_two_process_accelerate_run_on_cpu(tiny_folder, tmp_path):
    """A real 2-process DDP run (gloo). `accelerate launch --cpu --num_processes 2` starts one process only
    (accelerate 1.15); `--multi_gpu` with CUDA hidden starts two, which join one gloo group."""
    text = tmp_path / "corpus.txt"
    text.write_text(pos_swap.offline.pydoc_text()[:20000])
    launcher = shutil.which("accelerate") or skip_missing("accelerate's launcher is not on PATH")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(pos_swap.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    argv = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "pos_swap", "finetune", str(tiny_folder), "--scheme", "alibi",
            "--trainable", "true", "--text", str(text), "--seq-len", "32", "--max-steps", "4", "--out", str(tmp_path / "run")]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    training = cells(_saved(tmp_path / "run"))["training"]
    assert training["processes"] == 2 and training["steps"] == 4
    assert pos_swap.describe(pos_swap.from_pretrained(tmp_path / "run" / "merged"))["scheme"] == "alibi"


@pytest.mark.slow
def test_training_benchmarks_run(tmp_path):
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        [root / "pe_families.py", "--seq-len", "16", "--steps", "2", "--batch-size", "2", "--families", "learned", "alibi",
         "--factors", "1", "2", "--layers", "1", "--out", tmp_path / "pe"],
        [root / "recover_cost.py", "--lengths", "16", "--repeats", "1", "--schemes", "yarn", "--out", tmp_path / "rc"],
    ]  # fmt: skip
    for argv in runs:
        done = subprocess.run([sys.executable, *map(str, argv)], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
    pe = {c["family"]: c for c in json.loads((tmp_path / "pe" / "results.json").read_text())["cells"]}
    assert pe["learned"]["ppl_2x"] is None and pe["alibi"]["ppl_2x"] > 1  # no table rows past the trained length
    assert (tmp_path / "pe" / "pe_families.png").exists() and (tmp_path / "pe" / "models" / "alibi" / "config.json").exists()
    (cost,) = json.loads((tmp_path / "rc" / "results.json").read_text())["cells"]
    assert cost["scheme"] == "yarn" and cost["time_ratio"] > 0 and (tmp_path / "rc" / "recover_cost.png").exists()


@pytest.mark.slow
def test_text_from_a_folder_and_a_dataset(tmp_path, smollm2_tokenizer):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "b.md").write_text("second part")
    (tmp_path / "a.txt").write_text("first part")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    tokens, label = train.load_tokens(smollm2_tokenizer, tmp_path)
    assert smollm2_tokenizer.decode(tokens) == "first part\n\nsecond part" and label == str(tmp_path)
    dataset = datasets.Dataset.from_dict({"text": ["first part", "second part"]})
    assert torch.equal(train.load_tokens(smollm2_tokenizer, dataset)[0], tokens)
    with pytest.raises(PosSwapError, match="'text' column"):
        train.load_tokens(smollm2_tokenizer, dataset.rename_column("text", "body"))


def test_alibi_distances_follow_pose_ids():
    """Without a cache, keys take the position ids too, so ALiBi's distances follow PoSE's skips; a uniform
    shift of the ids changes no distance and no logit."""
    from pos_swap.attention import positions

    ids = train.pose_position_ids(16, 64, 2, torch.Generator().manual_seed(4))[None]
    query = torch.zeros(1, 4, 16, 8)
    q_pos, k_pos = positions({"position_ids": ids}, query, query, None)
    assert torch.equal(q_pos, ids) and torch.equal(k_pos, ids)
    q_pos, k_pos = positions({}, query, query, None)  # no ids: slots
    assert torch.equal(k_pos, torch.arange(16)[None])
    model = tiny("llama")
    pos_swap.patch(model, "alibi")
    tokens = bigram_tokens(16)[None]
    assert not torch.allclose(outputs(model, tokens), outputs(model, tokens, position_ids=ids))
    shifted = torch.arange(16)[None] + 7  # a uniform shift keeps every distance
    torch.testing.assert_close(outputs(model, tokens), outputs(model, tokens, position_ids=shifted))


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")])
def test_example_accelerate_configs_load_with_accelerate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parent.parent / "examples" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.name == kind and config.num_processes >= 2
    assert f"--config_file examples/accelerate/{name}.yaml -m pos_swap finetune" in path.read_text().splitlines()[0]
    if kind == "FSDP":  # version 2: LoRA's frozen and trained weights mix, and CPU processes can start it
        assert config.fsdp_config["fsdp_version"] == 2

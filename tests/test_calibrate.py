"""``pos-swap calibrate`` / ``pos_swap.evaluate.calibrate``: DPE's group sizes chosen from the frequency use and the
passkey score. The rules against their formulas, the frequency use against q and k recomputed in float64, the
search's bookkeeping on a tiny model, the files it writes, and bad input refused before the model loads."""

import json

import numpy as np
import pytest
import torch

import pos_swap
from pos_swap import engine
from pos_swap.errors import PosSwapError
from pos_swap.evaluate import calibration, retrieval
from conftest import assert_figure, tiny
from test_cli_errors import byte_tokenizer, one_line_error

TRAINED, TARGET = 128, 512


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def tiny_lm(trained=TRAINED):
    return tiny("llama", vocab_size=256, max_position_embeddings=trained)


@pytest.mark.parametrize("trained, target", [(8192, 16384), (8192, 12288), (8192, 32768), (128, 512), (4096, 100000)])
def test_the_start_is_longlm_with_powers_of_two(trained, target):
    window, group = calibration.start_setting(trained, target)
    assert window & (window - 1) == 0 and window <= trained // 8 < 2 * window
    assert group & (group - 1) == 0 and (trained - window) * group + window >= target
    assert group == 2 or (trained - window) * (group // 2) + window < target  # the smallest such power of two


def test_plane_groups_are_the_most_up_to_eight_that_divide():
    assert [calibration.plane_groups(p) for p in (32, 64, 8, 4, 12, 7)] == [8, 8, 8, 4, 6, 7]


def test_frequency_use_is_mean_q_norm_times_mean_k_norm_per_plane(tokenizer):
    model = tiny_lm()
    use = calibration.frequency_use(model, tokenizer, 100)
    captured = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, k: captured.append((m, k["hidden_states"])),
                                                       with_kwargs=True) for layer in model.model.layers]  # fmt: skip
    ids = tokenizer((retrieval.FILLER + " ") * 2, add_special_tokens=False)["input_ids"][:100]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    config, per_layer = model.config, []
    for attention, hidden in captured:
        q, k = (torch.nn.functional.linear(hidden.double(), proj.weight.detach().double())
                for proj in (attention.q_proj, attention.k_proj))  # fmt: skip
        q = q.view(1, -1, config.num_attention_heads, config.head_dim)
        k = k.view(1, -1, config.num_key_value_heads, config.head_dim)
        k = k.repeat_interleave(config.num_attention_heads // config.num_key_value_heads, dim=2)
        half = config.head_dim // 2  # plane p pairs features p and p + D/2; a rotation keeps its norm
        norms = [torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2).mean(dim=(0, 1)) for x in (q, k)]  # (H, F)
        per_layer.append((norms[0] * norms[1]).mean(dim=0))
    expected = torch.stack(per_layer).mean(dim=0)
    np.testing.assert_allclose(use, expected.numpy(), rtol=1e-4)
    assert use.shape == (config.head_dim // 2,)


def test_calibrate_searches_the_most_used_groups_and_keeps_the_best(tokenizer, tmp_path):
    model = tiny_lm()
    result = pos_swap.evaluate.calibrate(model, tokenizer, TARGET, groups=4, depths=(0.5, 1.0), tune=2,
                                         out=tmp_path, progress=False)  # fmt: skip
    assert pos_swap.describe(model) is None  # the model is left unpatched
    assert (result["window"], result["start_group"], result["groups"], result["planes"]) == (16, 8, 4, 8)
    share = np.array(result["group_use_share"])
    np.testing.assert_allclose(share, np.array(result["frequency_use"]).reshape(4, 2).sum(1) / sum(result["frequency_use"]))
    assert result["search_order"] == list(np.argsort(-share, kind="stable")[:2])
    assert result["sizes_tried"] == [2, 4, 16]
    cells = {tuple(c["groups"]): c for c in result["cells"]}
    assert len(cells) == 1 + 2 * 3
    first, second = result["search_order"]
    best_first = max([[8] * 4] + [[s if g == first else 8 for g in range(4)] for s in (2, 4, 16)],
                     key=lambda sizes: cells[tuple(sizes)]["objective"])  # fmt: skip
    assert list(cells)[4][first] == best_first[first]  # the second group is searched from the first's best
    assert result["best"]["objective"] == max(c["objective"] for c in result["cells"])
    sizes = result["best"]["groups"]
    with pos_swap.patched(model, "dpe", window=16, groups=sizes):  # the objective is the passkey score of that patch
        rows = retrieval.passkey(model, tokenizer, [TARGET], (0.5, 1.0), progress=False)
    assert result["best"]["objective"] == pytest.approx(np.mean([r["answer_logprob"] / r["answer_tokens"] for r in rows]))
    assert result["python"] == f'pos_swap.patch(model, "dpe", window=16, groups={sizes})'
    exec(result["python"], {"pos_swap": pos_swap, "model": model})
    assert pos_swap.describe(model)["params"]["groups"] == sizes
    saved = json.loads((tmp_path / "calibrate.json").read_text())
    assert saved["python"] == result["python"] and len(saved["cells"]) == 7
    assert_figure(tmp_path / "calibrate.png", size=(12, 4.2))
    assert "<- chosen" in calibration.summary(result) and result["python"] in calibration.summary(result)


def test_quick_tries_two_sizes_of_one_group(tokenizer):
    result = pos_swap.evaluate.calibrate(tiny_lm(), tokenizer, TARGET, depths=(0.5,), quick=True, progress=False)
    assert result["sizes_tried"] == [4, 16] and len(result["cells"]) == 3 and result["groups"] == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target=TRAINED), "within the trained context"),
        (dict(groups=3), "must divide this model's 8 rotary planes"),
        (dict(window=24), "must be a multiple of 16"),
        (dict(tune=-1), "--tune"),
    ],
)
def test_bad_settings_raise_before_measuring(tokenizer, monkeypatch, kwargs, message):
    monkeypatch.setattr(calibration, "frequency_use", lambda *a: pytest.fail("measured before refusing"))
    with pytest.raises(PosSwapError, match=message):
        pos_swap.evaluate.calibrate(tiny_lm(), tokenizer, **{"target": TARGET, **kwargs})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_lm().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scheme", "rerope", "--length", "512"], "invalid choice: 'rerope'"),
        (["--length", "512"], "the following arguments are required: --scheme"),
        (["--scheme", "dpe", "--length", "64"], "within the trained context (128)"),
        (["--scheme", "dpe", "--length", "1e9x"], "Cannot read length"),
        (["--scheme", "dpe", "--length", "512", "--groups", "3"], "--groups 3 must divide this model's 8 rotary planes"),
        (["--scheme", "dpe", "--length", "512", "--window", "12"], "--window 12 must be a multiple of 16"),
        (["--scheme", "dpe", "--length", "512", "--depths", "0.5,2"], "Cannot use needle depth '2'"),
        (["--scheme", "dpe", "--length", "512", "--tune", "-1"], "--tune is the number of plane groups"),
        (["--scheme", "dpe", "--length", "512", "--out", "FILE"], "is a file; give a folder"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line_before_loading(model_dir, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(engine, "from_pretrained", lambda *a, **k: pytest.fail("the weights were loaded"))
    (tmp_path / "file").write_text("x")
    out = ["--out", tmp_path / "out"] if "--out" not in argv else []
    argv = ["calibrate", model_dir, *[tmp_path / "file" if a == "FILE" else a for a in argv], *out]
    assert message in one_line_error(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_patched_checkpoint(tmp_path, capsys, monkeypatch):
    model = tiny_lm()
    pos_swap.patch(model, "dpe", window=16, groups=[8, 8])
    model.save_pretrained(tmp_path / "patched")
    byte_tokenizer().save_pretrained(tmp_path / "patched")
    monkeypatch.setattr(engine, "from_pretrained", lambda *a, **k: pytest.fail("the weights were loaded"))
    line = one_line_error(["calibrate", tmp_path / "patched", "--scheme", "dpe", "--length", "512", "--out",
                           tmp_path / "out"], capsys)  # fmt: skip
    assert "carries a pos_swap patch" in line


def test_cli_prints_the_patch_line_and_writes_the_files(model_dir, tmp_path, capsys):
    from pos_swap.cli import main

    out = tmp_path / "out"
    assert main(["calibrate", str(model_dir), "--scheme", "dpe", "--length", "512", "--quick", "--depths", "0.5",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    saved = json.loads((out / "calibrate.json").read_text())
    assert saved["python"] in printed and (out / "calibrate.png").exists()

"""The pos-swap command line, run in-process and once as the installed console script."""

import json
import subprocess
import sys

import pytest
import torch

import pos_swap
from pos_swap.cli import main
from conftest import tiny


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny("llama").save_pretrained(path)
    return path


def test_help_teaches_every_subcommand(capsys):
    for argv in (["--help"], ["patch", "--help"], ["info", "--help"], ["schemes", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
    out = capsys.readouterr().out
    assert "offline:smollm2" in out and "--scheme yarn:factor=4" in out and "--export" in out


@pytest.mark.parametrize("command", ["patch", "probe", "finetune"])
def test_each_command_s_help_is_about_that_command(command, capsys):
    """A scheme is named NAME[:PARAM=VALUE...] everywhere; the parameters of every scheme are not listed as flags."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "--scheme NAME[:PARAM=VALUE...]" in out and "yarn:factor=4" in out
    assert "--beta-fast" not in out and "--long-factor" not in out and "--factor" not in out


def test_schemes_lists_names_and_parameters(capsys):
    assert main(["schemes", "-v"]) == 0
    out = capsys.readouterr().out
    for name in pos_swap.list_schemes():
        assert name in out
    assert "long_factor" in out and "(required)" in out and "NAME:PARAM=VALUE" in out


def test_info_describes_the_positional_mechanism(model_dir, capsys):
    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "llama" and info["positions"] == "rotary"
    assert info["trained_context"] == 32 and info["rotary"][0]["rotary_dim"] == 16
    assert info["patch"] is None


def test_patch_saves_a_model_that_loads_patched(model_dir, tmp_path, capsys):
    out = tmp_path / "yarn"
    assert main(["patch", str(model_dir), "--scheme", "yarn", "--factor", "4", "--beta-fast", "16", "--out", str(out)]) == 0
    loaded = pos_swap.from_pretrained(out)
    assert pos_swap.describe(loaded)["params"]["beta_fast"] == 16.0
    expected = tiny("llama")
    pos_swap.patch(expected, "yarn", factor=4.0, beta_fast=16.0)
    ids = torch.randint(3, 100, (1, 50))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["patch"]["scheme"] == "yarn"


def test_scheme_named_with_its_parameters_equals_the_older_flags(model_dir, tmp_path, capsys):
    """--scheme yarn:factor=4:beta_fast=16 (the form eval takes) and --scheme yarn --factor 4 --beta-fast 16 save
    the same patch; both forms together must agree."""
    spec, flags = tmp_path / "spec", tmp_path / "flags"
    assert main(["patch", str(model_dir), "--scheme", "yarn:factor=4:beta-fast=16", "--out", str(spec)]) == 0
    assert main(["patch", str(model_dir), "--scheme", "yarn", "--factor", "4", "--beta-fast", "16", "--out", str(flags)]) == 0
    described = [pos_swap.describe(pos_swap.from_pretrained(path)) for path in (spec, flags)]
    assert described[0] == described[1] and described[0]["params"]["beta_fast"] == 16.0
    assert main(["patch", str(model_dir), "--scheme", "yarn:factor=4", "--factor", "2", "--out", str(tmp_path / "x")]) == 2
    assert "'factor' is given twice" in capsys.readouterr().err
    assert main(["patch", str(model_dir), "--scheme", "alibi", "--factor", "2", "--out", str(tmp_path / "x")]) == 2
    assert "Scheme 'alibi' has no parameter 'factor'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_patch_export_hf_and_list_parameters(model_dir, tmp_path):
    out = tmp_path / "hf"
    argv = ["patch", str(model_dir), "--scheme", "longrope", "--factor", "4", "--long-factor", ",".join(["2"] * 8),
            "--per-position", "false"]  # whole-window frequencies: the form transformers can express
    assert main(argv + ["--out", str(out), "--export", "hf"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "longrope" and config["rope_parameters"]["long_factor"] == [2.0] * 8


def test_patching_a_patched_checkpoint_needs_replace(model_dir, tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["patch", str(model_dir), "--scheme", "yarn", "--factor", "4", "--out", str(first)]) == 0
    assert main(["patch", str(first), "--scheme", "linear", "--factor", "2", "--out", str(second)]) == 2
    assert "replace" in capsys.readouterr().err
    assert main(["patch", str(first), "--scheme", "linear", "--factor", "2", "--out", str(second), "--replace"]) == 0
    assert pos_swap.describe(pos_swap.from_pretrained(second))["scheme"] == "linear"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--scheme", "yarn", "--factor", "0.5"], "must be > 1"),
        (["--scheme", "yarn"], "needs parameter 'factor'"),
    ],
)
def test_bad_input_is_a_clear_error(model_dir, tmp_path, capsys, argv, message):
    assert main(["patch", str(model_dir), *argv, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "pos_swap.cli", "schemes"], capture_output=True, text=True)
    assert done.returncode == 0 and "yarn" in done.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/nonexistent"], "No model folder at '/nonexistent'"),
        (["patch", "./no-such-model", "--scheme", "yarn", "--factor", "4", "--out", "x"], "No model folder"),
        (["info", "offline:smollm3"], "Unknown offline checkpoint 'offline:smollm3'"),
        (["patch", "MODEL", "--scheme", "yarn", "--factor", "4", "--truncate", "maybe", "--out", "x"], "expected true or false"),
        (["patch", "MODEL", "--scheme", "yarn", "--factr", "4", "--out", "x"], "Did you mean '--factor'?"),
        (["patch", "MODEL", "--scheme", "yarn", "--factor", "abc", "--out", "x"], "expected float, got 'abc'"),
        (["patch", "MODEL", "--scheme", "rope", "--scaling-params", "[1]", "--out", "x"], "expected a dictionary"),
        (["patch", "MODEL", "--scheme", "YaRN", "--factor", "4", "--out", "x"], "Did you mean 'yarn'?"),
        (["patch", "MODEL", "--scheme", "ntk", "--factor", "1e300", "--out", "x"], "must be at most 65536"),
        (["patch", "MODEL", "--scheme", "yarm:factor=4", "--out", "x"], "Did you mean 'yarn'?"),
        (["patch", "MODEL", "--scheme", "yarn:factr=4", "--out", "x"], "Scheme 'yarn' has no parameter 'factr'"),
        (["patch", "MODEL", "--scheme", "yarn:factor=abc", "--out", "x"], "Cannot read factor='abc'"),
        (["patch", "MODEL", "--scheme", "native", "--out", "x"], "'native' is the model without a patch"),
        (["finetune", "MODEL", "--scheme", "alibi:slopes=x", "--out", "x"], "Cannot read slopes='x'"),
        (["probe", "MODEL", "--scheme", "dynamik", "--out", "x"], "Did you mean 'dynamic'?"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_naming_the_fix(model_dir, tmp_path, capsys, argv, message):
    argv = [str(model_dir) if a == "MODEL" else str(tmp_path / a) if a == "x" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("pos-swap")]  # besides loading progress bars
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_scaling_params_accept_json_and_python_literals(tmp_path):
    gpt2 = tmp_path / "gpt2"
    tiny("gpt2").save_pretrained(gpt2)
    for text in ('{"factor": 4.0}', "{'factor': 4.0}"):
        out = tmp_path / f"out{len(text)}"
        assert main(["patch", str(gpt2), "--scheme", "rope", "--scaling", "linear", "--scaling-params", text, "--out", str(out)]) == 0
        assert pos_swap.describe(pos_swap.from_pretrained(out))["params"]["scaling_params"] == {"factor": 4.0}


def test_self_extend_window_over_the_trained_context_warns(model_dir, tmp_path):
    with pytest.warns(UserWarning, match="covers the whole trained context"):
        main(["patch", str(model_dir), "--scheme", "self-extend", "--group", "4", "--window", "64", "--out", str(tmp_path / "x")])

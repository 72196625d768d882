"""The whole probe run and ``pos-swap probe``: every output written, bad input refused."""

import json

import pytest

from pos_swap import cli
from pos_swap.probe.run import run_probe
from conftest import assert_figure, tiny
from test_probe_tables import CharTokenizer

TEXT = "def probe(model):\n    return model.positions  # what did it learn?\n" * 30
FIGURES = ["encoding.png", "similarity.png", "pca.png", "spectrum.png", "hidden_probe.png", "distance_profiles.png",
           "sink_mass.png", "previous_token.png"]  # fmt: skip


@pytest.mark.parametrize("arch,scheme,params", [("llama", "dynamic", {"factor": 2.0}), ("gpt2", "sinusoidal", {})])
def test_run_writes_json_figures_and_report(tmp_path, arch, scheme, params):
    model = tiny(arch)
    cells = run_probe(model, CharTokenizer(), tmp_path, scheme=scheme, params=params, compare=True, text=TEXT,
                      length=30, window=30, windows=3, seeds=2, pairs=256)  # fmt: skip
    assert list(cells) == ["native", scheme]
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert [cell["key"] for cell in saved["cells"]] == ["native", scheme] and saved["meta"]["scheme"] == scheme
    for cell in saved["cells"]:
        assert {"absolute_mae", "absolute_mae_std", "relative_error", "relative_error_std"} <= set(cell["table"])
        layers = len(cell["attention"]["sink_mass"])
        assert len(cell["hidden"]["absolute_mae"]) == layers + 1
    figures = FIGURES + (["rope_frequency_use.png"] if arch == "llama" else [])
    for name in figures:
        assert_figure(tmp_path / name)
    report = (tmp_path / "report.html").read_text()
    assert report.count("<img") == len(figures) and "Hidden-state probe" in report
    if arch == "gpt2":  # the sinusoidal table carries absolute position exactly
        assert cells["sinusoidal"]["table"]["absolute_mae"] == 0.0 < cells["native"]["table"]["absolute_mae"]


def test_cli_refuses_bad_combinations(capsys):
    assert cli.main(["probe", "offline:minilm", "--out", "x", "--compare"]) == 2
    assert "--compare shows the native model beside a patched one" in capsys.readouterr().err
    assert cli.main(["probe", "offline:minilm", "--out", "x", "--factor", "2"]) == 2
    assert "need --scheme" in capsys.readouterr().err

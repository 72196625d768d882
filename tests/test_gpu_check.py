"""benchmarks/gpu_check.py: without CUDA it says so and exits 0; its code (the CUDA path forced on the CPU, eager
flex and SDPA) runs on a tiny model, checks pass, and the JSON and PNG are written."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_quick_cpu_run_checks_the_cuda_path_code_and_writes_json_and_png(tmp_path):
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--quick", "--schemes", "alibi", "self-extend", "--repeats", "1", "--out", str(out)]
    assert gpu_check.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    checks = results["checks"]
    assert {r["scheme"] for r in checks} == {"alibi", "self-extend"} and all(r["passed"] for r in checks)
    assert {r["kernels"].split()[0] for r in checks} == {"sdpa", "flex"}  # the device path ran, not chunked
    assert any(r["decode_steps"] for r in checks) and {r["dtype"] for r in checks} == {"float32", "bfloat16"}
    costs = results["costs"]
    assert {(r["scheme"], r["length"]) for r in costs} == {(s, n) for s in ("native", "alibi", "self-extend") for n in (64, 128)}
    assert all(r["ms"] > 0 for r in costs)
    assert (out / "gpu_check.png").stat().st_size > 0


def test_a_wrong_device_path_fails_the_check(monkeypatch, tmp_path, capsys):
    """The check compares against the chunked path: a kernel that drops its additive mask must fail it."""
    from pos_swap import fused

    original = fused.Flex.__call__
    monkeypatch.setattr(fused.Flex, "__call__", lambda self, q, k, v, scale, causal=False, mask=None:
                        original(self, q, k, v, scale, causal=causal))  # fmt: skip
    argv = ["--device", "cpu", "--quick", "--schemes", "self-extend", "--repeats", "1", "--budget", "0", "--out", str(tmp_path)]
    assert gpu_check.main(argv) == 1
    assert "checks failed: self-extend" in capsys.readouterr().out

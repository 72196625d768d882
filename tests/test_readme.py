"""The README stays true: its Python quick start and its pos-swap commands run as written (offline)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_pos_swap_commands_run_as_written(tmp_path):
    commands = [line for line in re.findall(r"^pos-swap .*$", README, re.M)]
    assert len(commands) >= 4
    for command in commands:
        argv = shlex.split(command)[1:]
        done = subprocess.run([sys.executable, "-m", "pos_swap.cli", *argv], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr[-2000:])


def test_benchmark_and_examples_run(tmp_path):
    runs = [
        [ROOT / "benchmarks" / "patch_overhead.py", "--lengths", "64", "--repeats", "1", "--schemes", "yarn", "dynamic",
         "--out", tmp_path / "bench"],
        [ROOT / "benchmarks" / "retrofit_cost.py", "--lengths", "64", "--repeats", "1", "--schemes", "alibi", "rope",
         "--out", tmp_path / "retro"],
        [ROOT / "benchmarks" / "probe_cost.py", "--lengths", "64", "--repeats", "1", "--out", tmp_path / "probe"],
        [ROOT / "benchmarks" / "per_position_cost.py", "--lengths", "64", "--decode-at", "64", "--repeats", "1",
         "--decode-repeats", "1", "--layers", "2", "--out", tmp_path / "perpos"],
        [ROOT / "benchmarks" / "sinks_stream.py", "--length", "300", "--step", "64", "--segment", "128", "--window", "60",
         "--out", tmp_path / "stream"],
        [ROOT / "benchmarks" / "retrieval_cost.py", "--length", "300", "--depths", "0,1", "--trials", "1",
         "--out", tmp_path / "sweep"],
        [ROOT / "examples" / "quickstart.py"],
        [ROOT / "examples" / "retrofits.py", "--length", "128"],
        [ROOT / "examples" / "long_context_perplexity.py", "--lengths", "128", "256", "--out", tmp_path / "ppl"],
    ]  # fmt: skip
    for argv in runs:
        done = subprocess.run([sys.executable, *map(str, argv)], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
    for plot in ("bench/overhead.png", "retro/retrofit_cost.png", "probe/probe_cost.png", "ppl/perplexity.png",
                 "stream/stream.png", "stream/cache.png", "perpos/per_position_cost.png"):
        assert (tmp_path / plot).exists(), plot

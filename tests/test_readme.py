"""The README and the docs pages stay true: their Python blocks and their pos-swap commands run as written (offline).

Each page runs in its own folder and namespace. Commands that take minutes (the demo as written) are marked
`long`: `python -m pytest -q` leaves them out, and CI runs them in a step of their own (`-m long`).
"""

import json
import re
import shlex
import textwrap
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LONG_COMMANDS = ("pos-swap demo",)  # run as written in the `long` step


def page_id(page):
    return str(page.relative_to(ROOT))


def commands(page, *, long):
    found = re.findall(r"^pos-swap .*$", page.read_text(), re.M)
    return [command for command in found if (command.strip() in LONG_COMMANDS) == long]


def run_commands(commands_, cwd):
    for command in commands_:
        argv = shlex.split(command)[1:]
        done = subprocess.run([sys.executable, "-m", "pos_swap.cli", *argv], cwd=cwd, capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr[-2000:])


def python_blocks(page):
    """The page's ```python blocks, also those indented inside a list item."""
    return [textwrap.dedent(block) for block in re.findall(r"^ *```python\n(.*?)^ *```", page.read_text(), re.S | re.M)]


WITH_PYTHON = [page for page in PAGES if python_blocks(page)]
WITH_COMMANDS = [page for page in PAGES if commands(page, long=False)]
LONG = [(page, command) for page in PAGES for command in commands(page, long=True)]


def test_readme_has_runnable_examples():
    readme = ROOT / "README.md"
    assert readme in WITH_PYTHON and len(commands(readme, long=False)) >= 4
    assert (readme, "pos-swap demo") in LONG


@pytest.mark.parametrize("page", WITH_PYTHON, ids=page_id)
def test_python_blocks_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in python_blocks(page):
        exec(compile(block, page_id(page), "exec"), namespace)


@pytest.mark.parametrize("page", WITH_COMMANDS, ids=page_id)
def test_pos_swap_commands_run_as_written(page, tmp_path):
    run_commands(commands(page, long=False), tmp_path)


@pytest.mark.long
@pytest.mark.parametrize("page, command", LONG, ids=lambda value: value if isinstance(value, str) else page_id(value))
def test_long_commands_run_as_written(page, command, tmp_path):
    run_commands([command], tmp_path)


def test_benchmark_and_examples_run(tmp_path):
    runs = [
        [ROOT / "benchmarks" / "patch_overhead.py", "--lengths", "64", "--repeats", "1", "--schemes", "yarn", "dynamic",
         "--out", tmp_path / "bench"],
        [ROOT / "benchmarks" / "retrofit_cost.py", "--lengths", "64", "--repeats", "1", "--schemes", "alibi", "rope",
         "--out", tmp_path / "retro"],
        [ROOT / "benchmarks" / "retrofit_cost.py", "--model", "offline:smollm2", "--layers", "1", "--lengths", "64",
         "--repeats", "1", "--schemes", "string", "dpe", "--out", tmp_path / "retro-rope"],
        [ROOT / "benchmarks" / "probe_cost.py", "--lengths", "64", "--repeats", "1", "--out", tmp_path / "probe"],
        [ROOT / "benchmarks" / "per_position_cost.py", "--lengths", "64", "--decode-at", "64", "--repeats", "1",
         "--decode-repeats", "1", "--layers", "2", "--out", tmp_path / "perpos"],
        [ROOT / "benchmarks" / "sinks_stream.py", "--length", "300", "--step", "64", "--segment", "128", "--window", "60",
         "--out", tmp_path / "stream"],
        [ROOT / "benchmarks" / "temperature_cost.py", "--lengths", "64", "--repeats", "1", "--layers", "1",
         "--schemes", "yarn", "rerope", "--out", tmp_path / "temperature"],
        [ROOT / "benchmarks" / "eval_cost.py", "--lengths", "64", "--repeats", "1", "--out", tmp_path / "evalcost"],
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
                 "stream/stream.png", "stream/cache.png", "perpos/per_position_cost.png", "evalcost/eval_cost.png"):
        assert (tmp_path / plot).exists(), plot
    rope_rows = json.loads((tmp_path / "retro-rope" / "results.json").read_text())
    assert {row["scheme"] for row in rope_rows["rows"]} == {"string", "dpe"} and not rope_rows["skipped"]

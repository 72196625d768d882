"""pos_swap.report: run folders (what blocks a folder, what a resumed run may change) and plots that leave
matplotlib's global state alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pos_swap.errors import PosSwapError
from pos_swap import report
from pos_swap.report import RunFolder, wrapped_label

DRAW = """
import sys
import pos_swap.report as report
report.line_plot(sys.argv[1] + "/line.png", {"a": ([1, 2], [3, 4])}, xlabel="x", ylabel="y", logy=True)
report.heatmaps(sys.argv[1] + "/heat.png", {"a": [[0, 1], [1, 0]]}, xlabel="x", ylabel="y", annotate=True)
report.scatter_panels(sys.argv[1] + "/scatter.png", {"a": ([0, 1], [1, 0], [0, 1])}, xlabel="x", ylabel="y")
print("pyplot" if "matplotlib.pyplot" in sys.modules else "no pyplot")
import matplotlib
print(matplotlib.get_backend())
"""


def test_drawing_leaves_the_backend_alone(tmp_path):
    """In a fresh process whose backend is svg (as a notebook's would be its inline one): after every kind of
    plot, pyplot was never imported and the backend is still svg; the PNGs are written."""
    env = {**os.environ, "MPLBACKEND": "svg",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", DRAW, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["no", "pyplot", "svg"]
    for name in ("line.png", "heat.png", "scatter.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_run_that_stopped_before_its_first_cell_does_not_block_the_next(tmp_path):
    """A command that failed before its first cell leaves only settings behind: the corrected command reuses the
    folder without --resume or --overwrite. Once a cell is in, the folder is refused as before."""
    RunFolder(tmp_path, kind="eval", meta={"lengths": [0]})  # failed right after writing its settings
    again = RunFolder(tmp_path, kind="eval", meta={"lengths": [16]})
    again.add({"key": "native|16"})
    with pytest.raises(PosSwapError, match="Pass --resume to continue it, --overwrite to replace it"):
        RunFolder(tmp_path, kind="eval", meta={"lengths": [16]})
    with pytest.raises(PosSwapError, match=r"other settings \(lengths differ\)"):
        RunFolder(tmp_path, kind="eval", meta={"lengths": [32]}, resume=True)
    resumed = RunFolder(tmp_path, kind="eval", meta={"lengths": [32]}, resume=True, may_change=("lengths",))
    assert resumed.done("native|16") and json.loads((tmp_path / "results.json").read_text())["meta"]["lengths"] == [32]


def test_a_command_without_resume_is_not_told_to_pass_it(tmp_path):
    RunFolder(tmp_path, kind="probe", meta={}, results="probe.json").add({"key": "native"})
    with pytest.raises(PosSwapError) as refused:
        RunFolder(tmp_path, kind="probe", meta={}, results="probe.json", resumable=False)
    assert "--overwrite to replace it" in str(refused.value) and "--resume" not in str(refused.value)


def test_long_scheme_labels_wrap_after_their_colons():
    label = "string:shift=2730:local_window=128:rope_factor=1.69"
    assert wrapped_label(label) == "string:shift=2730:local_window=128:\nrope_factor=1.69"
    assert wrapped_label(label).replace("\n", "") == label
    assert wrapped_label("rerope:window=4096") == "rerope:window=4096"
    assert wrapped_label("a_very_long_scheme_name_without_colons_at_all", width=10).count("\n") == 0


@pytest.mark.parametrize("count", [1, 3, 5, 6])
def test_heatmap_titles_do_not_run_into_each_other(tmp_path, monkeypatch, count):
    """Five 32k passkey panels with the real scheme labels: each drawn title stays clear of its neighbours."""
    import contextlib

    labels = ["native", "rerope:window=4096:leaky_factor=16", "self-extend:window=1025:group=5",
              "dpe:window=1024:groups=[4;8;8;8]", "string:shift=2730:local_window=128:leaky_factor=16",
              "dual-chunk:chunk_size=6144:local_window=512"][:count]  # fmt: skip
    drawn = []
    original = report.figure

    @contextlib.contextmanager
    def keep(*args, **kwargs):
        with original(*args, **kwargs) as (fig, axes):
            yield fig, axes
        drawn.append(fig)

    monkeypatch.setattr(report, "figure", keep)
    report.heatmaps(tmp_path / "heat.png", {label: [[0.0], [1.0]] for label in labels}, xlabel="length",
                    ylabel="needle depth", annotate=True, colorbar="exact-match accuracy")  # fmt: skip
    (fig,) = drawn
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(boxes) == count
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:])), [(b.x0, b.x1) for b in boxes]
    assert all(box.x0 >= 0 and box.x1 <= fig.bbox.width for box in boxes)  # inside the figure




EXIT = """
import atexit, sys
from pos_swap import report
report.RunFolder(sys.argv[1], kind="eval", meta={})
streams = list(report._HELD_LOCKS.values())
atexit._run_exitfuncs()  # what the interpreter runs as it exits
print(len(streams), all(stream.closed for stream in streams))
"""


def test_the_locks_a_process_holds_are_closed_as_it_exits(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    RunFolder(tmp_path / "here", kind="eval", meta={})
    with pytest.raises(BlockingIOError), open(tmp_path / "here" / ".results.json.lock", "a") as stream:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while this process runs
    report._release_locks()
    with open(tmp_path / "here" / ".results.json.lock", "a") as stream:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
    ended = subprocess.run([sys.executable, "-c", EXIT, str(tmp_path / "there")], capture_output=True, text=True)
    assert ended.stdout.split() == ["1", "True"], ended.stderr  # closed at exit, not left to the interpreter


@pytest.mark.parametrize("values, expected", [
    ((7.64, 15.98), ["8", "10", "12", "14", "16"]),  # a factor 2: round numbers every 2, none hidden
    ((9.2, 3937.0), ["10", "20", "50", "100", "200", "500", "1000", "2000", "5000"]),  # decades: 1, 2 and 5 in each
])  # fmt: skip
def test_log_axes_label_plain_numbers_across_the_values(values, expected):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    ax.plot([0, 1], values)
    report.log_axis_ticks(ax)
    low, high = ax.get_ylim()
    shown = [t.get_text() for t in ax.get_yticklabels() if low <= t.get_position()[1] <= high]
    assert shown == expected

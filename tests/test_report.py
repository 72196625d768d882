"""pos_swap.report draws without touching matplotlib's global state: a user's session keeps its backend."""

import os
import subprocess
import sys
from pathlib import Path

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

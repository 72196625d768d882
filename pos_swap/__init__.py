"""pos_swap: swap the positional mechanism of a pretrained transformers model at run time.

    patch = pos_swap.patch(model, "yarn", factor=4.0)   # in place; returns a handle
    patch.remove()                                       # bit-identical to before
"""

from . import schemes  # the subpackage: importing it registers every scheme
from .engine import Patch, __version__, describe, export_hf, from_pretrained, observe, patch, patched, unpatch
from .errors import PosSwapError
from .registry import get_scheme, list_schemes
from .schemes.sinks import SinkCache  # the bounded cache of the sinks scheme, for generate(cache=...)

__all__ = [
    "Patch", "PosSwapError", "SinkCache", "__version__", "describe", "export_hf", "from_pretrained", "get_scheme", "list_schemes",
    "observe", "patch", "patched", "schemes", "unpatch",
]  # fmt: skip

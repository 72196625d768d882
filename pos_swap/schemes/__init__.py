"""The positional schemes: one module per scheme, each registering its class with ``registry.register``.

To add a scheme: write ``schemes/<name>.py`` with a ``Config`` dataclass and a ``@register``-ed ``Scheme`` subclass
(see ``linear.py`` for the smallest one), then import the module below. The import order is the listing order.
"""

# RoPE scaling for RoPE models
from . import linear, ntk, dynamic, yarn, longrope, llama3  # noqa: F401, I001

# retrofits that change the kind of positional mechanism
from . import alibi, sinusoidal, learned_interpolate, rope, nope, p_rope, cope, self_extend, rerope, dual_chunk, sinks  # noqa: F401, I001
from . import string, dpe  # noqa: F401, I001

"""The registry of positional schemes: one module per scheme, one entry here per scheme.

To add a scheme: write ``schemes/<name>.py`` with a ``Config`` dataclass and a ``Scheme`` subclass (see
``linear.py`` for the smallest one), then add its class below.
"""

from .alibi import Alibi
from .cope import CoPEScheme
from .dynamic import Dynamic
from .learned_interpolate import LearnedInterpolate
from .linear import Linear
from .llama3 import Llama3
from .longrope import LongRope
from .nope import NoPE
from .ntk import NTK
from .rope import Rope
from .self_extend import SelfExtend
from .sinusoidal import Sinusoidal
from .yarn import DynamicYarn, Yarn

SCHEMES = {
    scheme.name: scheme
    for scheme in (
        # RoPE scaling for RoPE models
        Linear, NTK, Dynamic, Yarn, DynamicYarn, LongRope, Llama3,
        # retrofits that change the kind of positional mechanism
        Alibi, Sinusoidal, LearnedInterpolate, Rope, NoPE, CoPEScheme, SelfExtend,
    )
}  # fmt: skip

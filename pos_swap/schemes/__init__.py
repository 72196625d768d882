"""The registry of positional schemes: one module per scheme, one entry here per scheme.

To add a scheme: write ``schemes/<name>.py`` with a ``Config`` dataclass and a ``Scheme`` subclass (see
``linear.py`` for the smallest one), then add its class below.
"""

from .dynamic import Dynamic
from .linear import Linear
from .llama3 import Llama3
from .longrope import LongRope
from .ntk import NTK
from .yarn import DynamicYarn, Yarn

SCHEMES = {scheme.name: scheme for scheme in (Linear, NTK, Dynamic, Yarn, DynamicYarn, LongRope, Llama3)}

"""pos_swap's errors: each names the problem and the fix. All are ``ValueError`` subclasses."""

import difflib


class PosSwapError(ValueError):
    """Base class of every error pos_swap raises on bad input."""


class UnknownSchemeError(PosSwapError):
    pass


class InvalidParameterError(PosSwapError):
    pass


class UnsupportedArchitectureError(PosSwapError):
    pass


class IncompatibleSchemeError(PosSwapError):
    pass


class AlreadyPatchedError(PosSwapError):
    pass


class NotPatchedError(PosSwapError):
    pass


def did_you_mean(word: str, choices) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""

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
    """' Did you mean 'x'?' for the closest choice (ignoring case), or '' when nothing is close."""
    by_lower = {str(choice).lower(): choice for choice in choices}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.5)
    return f" Did you mean '{by_lower[close[0]]}'?" if close else ""

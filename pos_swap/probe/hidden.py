"""Hidden-state probes: how much absolute position each layer's hidden states carry, on real text.

A model without a table (RoPE, ALiBi, NoPE) keeps position only in its hidden states. The text is cut into
``windows`` windows of ``window`` tokens; for each layer, Wang & Chen's absolute probe regresses the position from
the hidden state with whole positions held out by fold (every window's row at a held-out position is tested).
"""

import torch
from tqdm import tqdm

from ..errors import PosSwapError
from .regression import absolute_position_probe


def text_windows(tokenizer, text: str, window: int, windows: int) -> torch.Tensor:
    """``(windows, window)`` token ids: consecutive windows from the start of ``text`` (no special tokens)."""
    if window < 2 or windows < 1:
        raise PosSwapError(f"Hidden-state probes need window >= 2 and windows >= 1; got {window} and {windows}.")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0] if text.strip() else []
    if len(ids) < window * windows:
        raise PosSwapError(
            f"The text has {len(ids)} tokens; {windows} windows of {window} need {window * windows}. Give a longer "
            f"text (--text FILE), or fewer or shorter windows."
        )
    return ids[: window * windows].view(windows, window)


def hidden_state_probe(model, tokenizer, text: str, window: int = 512, windows: int = 4, folds: int = 5,
                       seeds: int = 3, ridge: float = 1e-2, progress: bool = True) -> dict:  # fmt: skip
    """Per layer (0 = embeddings), the absolute-position probe on the hidden states: ``absolute_mae`` and
    ``absolute_mae_std`` lists, with ``chance_mae`` (predicting the mean position) for scale."""
    ids = text_windows(tokenizer, text, window, windows).to(model.device)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # layers + 1 of (windows, window, D)
    positions = torch.arange(window).repeat(windows)
    layers = [absolute_position_probe(h.reshape(-1, h.shape[-1]).float().cpu(), positions, folds, seeds, ridge)
              for h in tqdm(hidden, desc="hidden-state probe", unit="layer", disable=not progress)]  # fmt: skip
    return {
        "window": window,
        "windows": windows,
        "absolute_mae": [layer["absolute_mae"] for layer in layers],
        "absolute_mae_std": [layer["absolute_mae_std"] for layer in layers],
        "chance_mae": (positions.double() - positions.double().mean()).abs().mean().item(),
    }

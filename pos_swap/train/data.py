"""Training data for recovery: a text (file, folder, ``datasets`` dataset, default Python's pydoc topics) cut into
a held-out tail for perplexity and packed training sequences, each with PoSE position ids when asked for."""

from pathlib import Path

import torch

from ..errors import PosSwapError
from ..loading import read_text, text_content, tokenize
from .pose import pose_position_ids

FOLDER_SUFFIXES = (".txt", ".md", ".rst")


def read_source(source=None) -> tuple[str, str]:
    """``(content, label)`` of ``source``: None (pydoc topics), a UTF-8 text file, a folder (its .txt, .md and .rst
    files in name order), or a ``datasets.Dataset`` with a ``text`` column. Needs no tokenizer, so the command line
    reads it before the model loads."""
    if source is None or isinstance(source, (str, Path)) and not Path(source).is_dir():
        return text_content(source)
    if isinstance(source, (str, Path)):
        files = sorted(p for p in Path(source).rglob("*") if p.suffix in FOLDER_SUFFIXES and p.is_file())
        if not files:
            raise PosSwapError(f"The folder '{source}' holds no {', '.join(FOLDER_SUFFIXES)} files; give text files.")
        return "\n\n".join(read_text(p) for p in files), str(source)
    columns = getattr(source, "column_names", None)
    if columns is None or "text" not in columns:
        raise PosSwapError(
            f"A dataset to train on needs a 'text' column (it has: {columns}); rename it with "
            f"dataset.rename_column(NAME, 'text')."
        )
    label = f"dataset {getattr(getattr(source, 'info', None), 'dataset_name', None) or type(source).__name__}"
    return "\n\n".join(source["text"]), label


def load_tokens(tokenizer, source=None) -> tuple[torch.Tensor, str]:
    """Token ids ``(N,)`` and a label of ``source`` (see :func:`read_source`)."""
    content, label = read_source(source)
    return tokenize(tokenizer, content, label), label


def split(tokens: torch.Tensor, seq_len: int, held_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training sequences ``(N, seq_len)`` packed from the start of ``tokens`` and the last ``held_out`` tokens
    for evaluation (never trained on)."""
    tokens = tokens.reshape(-1)
    count = (tokens.numel() - held_out) // seq_len
    if count < 1:
        raise PosSwapError(
            f"The text holds {tokens.numel()} tokens: after the {held_out} held out for evaluation (up to the longest "
            f"evaluation length) fewer than one {seq_len}-token training sequence is left. Give a longer text "
            f"(--text FILE) or a shorter --seq-len."
        )
    return tokens[: count * seq_len].view(count, seq_len), tokens[-held_out:]


class PackedSequences(torch.utils.data.Dataset):
    """Causal-LM examples from packed sequences. With ``pose_target``, each carries PoSE ``position_ids`` drawn from
    a generator seeded by (``seed``, index): the same example always gets the same ids, so a resumed run sees the
    very batches an uninterrupted one would."""

    def __init__(self, sequences: torch.Tensor, pose_target: int | None = None, chunks: int = 2, seed: int = 0):
        self.sequences, self.pose_target, self.chunks, self.seed = sequences, pose_target, chunks, seed

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, index: int) -> dict:
        ids = self.sequences[index]
        example = {"input_ids": ids, "labels": ids}
        if self.pose_target:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            example["position_ids"] = pose_position_ids(ids.numel(), self.pose_target, self.chunks, generator)
        return example

"""What a recovery run trains: LoRA on the attention projections the architecture map names, and optionally the
embeddings and norms (LongLoRA) and the scheme's own parameters (trainable ALiBi slopes, CoPE tables)."""

import peft
import torch

from .. import archs
from ..attention import HOOK
from ..engine import resolve
from ..errors import PosSwapError


def scheme_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters a patch added (those under the ``pos_swap`` submodules)."""
    return [name for name, _ in resolve(model).named_parameters() if f".{HOOK}." in f".{name}"]


def extra_modules(model: torch.nn.Module, *, embeddings: bool, norms: bool, scheme: bool | None) -> list[str]:
    """Module names (suffixes peft matches) trained in full beside the adapter. ``scheme=None`` trains the scheme's
    parameters when it has any; ``True`` demands them."""
    model = resolve(model)
    names = []
    if scheme or scheme is None and scheme_parameters(model):
        if not scheme_parameters(model):
            raise PosSwapError(
                "The scheme has no trainable parameters, so --train-scheme has nothing to train. Give it some "
                "(alibi: --trainable true; cope has tables) or leave --train-scheme off."
            )
        names.append(HOOK)
    if embeddings:
        embedding = model.get_input_embeddings()
        names += [name for name, module in model.named_modules() if module is embedding]
    if norms:
        names += archs.norm_names(model)
    return names


def lora_config(model: torch.nn.Module, rank: int, alpha: float, extras: list[str]) -> peft.LoraConfig:
    """peft's LoRA config for ``model``: targets and weight layout from the architecture map."""
    spec = archs.lookup(resolve(model))
    return peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(spec.lora_targets),
        fan_in_fan_out=spec.lora_fan_in_fan_out, modules_to_save=extras or None, task_type="CAUSAL_LM",
    )  # fmt: skip


def check_trainable(model: torch.nn.Module, rank: int, extras: list[str]) -> None:
    if rank == 0 and not extras:
        raise PosSwapError(
            "Nothing to train: LoRA is off (--lora-rank 0) and no embeddings, norms or scheme parameters are "
            "trainable. Give --lora-rank above 0, --train-embeddings, --train-norms, or a scheme with parameters."
        )


def trainable(model: torch.nn.Module, rank: int, alpha: float, *, embeddings=False, norms=False, scheme=None):
    """``model`` ready to train: wrapped with LoRA (``rank > 0``), or with only the extra modules unfrozen
    (``rank == 0``). Refuses a run that would train nothing."""
    extras = extra_modules(model, embeddings=embeddings, norms=norms, scheme=scheme)
    if rank > 0:
        return peft.get_peft_model(model, lora_config(model, rank, alpha, extras))
    check_trainable(model, rank, extras)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(f".{extra}." in f".{name}" for extra in extras))
    return model

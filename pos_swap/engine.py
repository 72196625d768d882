"""The patch engine: put a scheme on one model instance, record every change, take it off exactly.

A :class:`Patch` is a stack of undo steps. Schemes change a model only through it (``set``, ``set_rotary``,
``route_attention``, ``hook_attention``), so ``remove()`` restores the very objects that were there before and
the model's outputs are bit-identical. The model first gets its own copy of its config, so a patch never
reaches another model that shared the config object.
"""

import contextlib
import copy
import json
import warnings
from collections import OrderedDict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from packaging.version import InvalidVersion, Version
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from . import archs, modifiers  # noqa: F401 - registers the modifiers
from .attention import HOOK, OBSERVERS, PAIRING, PREFIX, observers_of, routed_name
from .attention_base import SINKS
from .errors import AlreadyPatchedError, IncompatibleSchemeError, NotPatchedError, PosSwapError
from .registry import Modifier, Scheme, get_scheme, split_modifiers

PATCH_ATTR = "_pos_swap_patch"  # the model attribute holding the live Patch
OBSERVED_ATTR = "_pos_swap_observed"  # set on a model while pos_swap.observe watches it
RECORD_KEY = "pos_swap"  # the config key that save_pretrained writes the patch under


class _Missing:
    """Marks an attribute that a patch added (undo deletes it). One instance, which copies and pickles keep."""

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()
HUB_KWARGS = ("cache_dir", "revision", "subfolder", "token", "local_files_only")  # kwargs that locate the files
LONG_CONTEXT = 2**17  # positions that default index buffers cover once a learned table is replaced
SAME_MODEL = "loads the same model: the saved rope_parameters carry the scheme"
NO_PLAIN_FORM = (
    "loads the UNPATCHED model: transformers has no form of this scheme. Load the folder with "
    "pos_swap.from_pretrained(DIR)."
)

try:
    __version__ = version("pos-swap")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def _owns(obj, name: str) -> bool:
    """Whether ``name`` is set on ``obj`` itself (or is a property of its class), not a class default."""
    stores = [vars(obj)] + [getattr(obj, s) for s in ("_buffers", "_parameters", "_modules") if hasattr(obj, s)]
    return any(name in store for store in stores) or isinstance(getattr(type(obj), name, None), property)


class Patch:
    """A live patch on one model: the scheme with its parameters, the modifiers around it, and the undo steps of
    their changes."""

    def __init__(self, model: torch.nn.Module, scheme: Scheme, modifiers: tuple[Modifier, ...] = ()):
        self.model = model
        self.scheme = scheme
        self.modifiers = modifiers
        self.frequency_rules = []  # modifiers' changes to rotary frequencies (Resonance), applied by tune()
        self.frequencies_tuned = False  # whether the scheme passed any rotary frequencies through tune()
        self._undo: list[tuple[object, str, object]] = []

    # -- the changes a scheme may make ---------------------------------------------------------------------
    def set(self, obj, name: str, value) -> None:
        """``setattr(obj, name, value)``, remembering what to put back."""
        self._undo.append((obj, name, getattr(obj, name) if _owns(obj, name) else _MISSING))
        setattr(obj, name, value)

    def tune(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """The rotary frequencies ``(..., F)`` a scheme sets, after the modifiers' frequency rules (Resonance).
        Schemes pass every frequency they rotate with through here (:meth:`set_rotary` does it for them)."""
        self.frequencies_tuned = True
        for rule in self.frequency_rules:
            inv_freq = rule(inv_freq)
        return inv_freq

    def tuned(self, frequencies):
        """``frequencies`` (``seq_len (B,)`` -> ``(inv_freq (B, F), scaling (B,))``) with :meth:`tune` applied."""
        self.frequencies_tuned = True
        return TunedFrequencies(frequencies, tuple(self.frequency_rules)) if self.frequency_rules else frequencies

    def set_rotary(self, slot: archs.RotarySlot, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        """Make a rotary table produce ``(cos, sin) * attention_scaling`` from ``inv_freq`` (after :meth:`tune`),
        statically."""
        self._set_rotary(slot, self.tune(inv_freq), attention_scaling)

    def _set_rotary(self, slot: archs.RotarySlot, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        current = slot.inv_freq
        inv_freq = inv_freq.to(device=current.device, dtype=current.dtype)
        for obj, name, value in slot.settings(inv_freq, attention_scaling):
            self.set(obj, name, value)

    def set_rotary_identity(self, slot: archs.RotarySlot) -> None:
        """Make a rotary table the identity (cos 1, sin 0): queries and keys, cached ones included, leave the
        model's attention unrotated, for a hook to rotate at attention time or for no rotation at all."""
        self._set_rotary(slot, torch.zeros(slot.dim // 2), 1.0)

    def route_attention(self, backend: str | None = None) -> None:
        """Send the model's attention through pos_swap's function, wrapping ``backend`` (default: the current
        one). The backend also decides which mask transformers builds for the model. Attention modules whose
        rotary pairs are not rotate-half (Cohere's interleaved pairs) get their pairing, by which the function
        reorders their queries and keys into rotate-half pairs: the pairs pos_swap's rotation turns. Modules with
        learned sink logits (GPT-OSS) get the name of that parameter, which pos_swap's attention reads."""
        config = self.model.config
        self.set(config, "_attn_implementation", routed_name(config, backend))
        for module, rot_dim, pairing in archs.reordered_attention(self.model):
            self.set(module, PAIRING, (rot_dim, pairing))
        for module, parameter in archs.sink_attention(self.model):  # pos_swap's own attention adds them too
            self.set(module, SINKS, parameter)
        who = f"pos_swap scheme '{self.scheme.name}'" if self.scheme else "pos_swap.observe"
        pinned = PinnedBackend(who, config._attn_implementation)
        for module in self.model.modules():  # the model and its inner PreTrainedModels share the config
            if isinstance(module, PreTrainedModel) and not _owns(module, "set_attn_implementation"):
                self.set(module, "set_attn_implementation", pinned)

    def hook_attention(self, modules, hook, backend: str | None = None) -> None:
        """Attach ``hook`` (one module, or a callable making one per attention module) as the submodule
        ``pos_swap`` of each attention module; pos_swap's attention function calls it for them."""
        why = archs.hook_refusal(self.model, modules)
        if why is not None:
            raise IncompatibleSchemeError(
                f"Scheme '{self.scheme.name}' acts at attention time, which this '{self.model.config.model_type}' "
                f"model does not allow: {why} Static schemes that only change the rotary frequencies (linear, ntk, "
                f"yarn, llama3) work on it."
            )
        self.route_attention(backend)
        for module in modules:
            self.set(module, HOOK, hook if isinstance(hook, torch.nn.Module) else hook(module))

    def remove_positions(self) -> None:
        """Switch the checkpoint's own positional signal off: rotary tables become the identity (cos 1, sin 0),
        a learned table returns zeros."""
        if archs.lookup(self.model).family == archs.ROTARY:
            for slot in archs.rotary_slots(self.model, every_layer_type=True):
                self.set_rotary_identity(slot)
        else:
            self.replace_table(zero_rows)

    def remove_rotation(self, modules) -> None:
        """Make the given attention modules position-free: each receives cos 1, sin 0 instead of the rotary tables
        (:class:`WithoutRotation`, a forward pre-hook), while the others keep theirs. On every backend, and keys
        enter the cache unrotated. The modules get new hook dicts, which removal swaps back: a forward pre-hook
        registered on one of them while the patch holds goes with it."""
        for module in modules:
            key = RemovableHandle(module._forward_pre_hooks).id  # a fresh key, as register_forward_pre_hook takes
            for name, value in (("_forward_pre_hooks", WithoutRotation()), ("_forward_pre_hooks_with_kwargs", True)):
                hooks = OrderedDict(getattr(module, name))  # new dicts: undo puts the old ones back
                hooks[key] = value
                self.set(module, name, hooks)

    def replace_table(self, embed) -> None:
        """Make the learned position table return ``embed(table, position_ids)`` instead of its rows. Its weights
        stay in place (and in the state dict), so saving, loading and removing the patch keep them intact.
        ``embed`` must be picklable (a module-level function or a ``functools.partial`` of one) and reach the
        table only through its argument, so that copies and pickles of the model read their own table."""
        table = archs.position_table(self.model)
        self.set(table, "forward", TableForward(table, embed, archs.lookup(self.model).table_positions_keyword))
        for path, fill in archs.lookup(self.model).index_buffers:
            owner_path, name = path.rsplit(".", 1)
            (owner,) = archs.find_modules(self.model, owner_path)
            old = getattr(owner, name)
            longer = torch.arange(LONG_CONTEXT, device=old.device) if fill == "arange" else old.new_zeros(LONG_CONTEXT)
            self.set(owner, name, longer.to(old.dtype)[None])

    # -- life cycle ----------------------------------------------------------------------------------------
    @property
    def record(self) -> dict:
        """What ``save_pretrained`` writes and ``pos_swap.from_pretrained`` re-applies; ``modifiers`` holds the
        keywords of the modifiers in use (absent without any)."""
        record = {"scheme": self.scheme.name, "params": self.params, "version": __version__}
        if self.modifiers:
            record["modifiers"] = {k: v for m in self.modifiers for k, v in copy.deepcopy(vars(m.config)).items()}
        return record

    @property
    def params(self) -> dict:
        return copy.deepcopy(vars(self.scheme.config))

    def own_config(self) -> None:
        """Give the model its own copy of its config, so changes to it never reach a model that shared it."""
        shared, own = self.model.config, copy.deepcopy(self.model.config)
        for module in self.model.modules():
            if getattr(module, "config", None) is shared:
                self.set(module, "config", own)

    def _apply(self) -> None:
        model = self.model
        self.own_config()
        for modifier in self.modifiers:
            modifier.before(self)
        self.scheme.apply(self)
        for modifier in self.modifiers:
            modifier.after(self)
        saved = {**self.record, "plain_transformers": NO_PLAIN_FORM}
        plain = None if self.modifiers else plain_rope_parameters(model, self.scheme)  # no transformers form
        if plain is not None:  # plain transformers then loads the same model from a saved folder
            native = copy.deepcopy(model.config.rope_parameters)
            saved.update(plain_transformers=SAME_MODEL, native_rope_parameters=native)
            self.set(model.config, "rope_parameters", plain)
        self.set(model.config, RECORD_KEY, saved)
        self.set(model, PATCH_ATTR, self)

    @property
    def active(self) -> bool:
        return self.model.__dict__.get(PATCH_ATTR) is self

    def remove(self) -> None:
        """Undo every change in reverse order; the model is then exactly as before the patch."""
        if not self._undo:
            raise NotPatchedError("This patch was already removed.")
        refuse_while_observed(self.model, "unpatch")
        self._undo_all()

    def _undo_all(self) -> list[tuple[object, str, object]]:
        """Undo every change in reverse order; returns the changes undone, for :meth:`_redo`. A restored tensor
        follows the dtype and device the model was cast or moved to since (``model.to(...)`` moved the patch's)."""
        undone = []
        while self._undo:
            obj, name, old = self._undo.pop()
            undone.append((obj, name, getattr(obj, name)))
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, _follow(old, undone[-1][2]))
        return undone

    def _redo(self, undone: list[tuple[object, str, object]]) -> None:
        """Put back the very objects :meth:`_undo_all` took off (trained CoPE tables, ALiBi slopes, ...)."""
        for obj, name, value in reversed(undone):
            self.set(obj, name, value)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in {**self.params, **self.record.get("modifiers", {})}.items())
        state = "" if self.active else " (removed)"
        return f"<pos_swap.Patch {self.scheme.name}({params}) on {type(self.model).__name__}{state}>"


def resolve(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model a patch lives on, under any peft wrapper (``PeftModel``, ``LoraModel``, ...): the
    engine's one look-up, so that patching, describing and removing work before and after ``get_peft_model``."""
    while type(model).__module__.startswith("peft."):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.model
    return model


class PinnedBackend:
    """Stands in for ``model.set_attn_implementation`` while a patch routes attention through pos_swap: a switch
    would bypass the patch (the model would silently run without it), so it is refused with the way to do it."""

    def __init__(self, who: str, routed: str):
        self.who, self.routed = who, routed  # who routes (a scheme, or pos_swap.observe), and to which name

    def __call__(self, attn_implementation, *args, **kwargs):
        wanted = attn_implementation
        if isinstance(wanted, dict):  # {"": backend} or per sub-config
            wanted = wanted.get("", self.routed)
        if wanted in (self.routed, self.routed.removeprefix(PREFIX)):
            return  # already the backend the patch wraps
        raise IncompatibleSchemeError(
            f"{self.who} routes this model's attention through '{self.routed}'; switching to "
            f"{wanted!r} now would bypass the patch. Unpatch first (pos_swap.unpatch(model)), switch, and patch "
            f"again, or load the model with attn_implementation={wanted!r}."
        )


class TunedFrequencies:
    """A length-following frequency source with the modifiers' frequency rules applied to its ``inv_freq`` (a class,
    so a patched model still copies and pickles)."""

    def __init__(self, frequencies, rules: tuple):
        self.frequencies, self.rules = frequencies, rules

    def __call__(self, seq_lens: torch.Tensor):
        inv_freq, scaling = self.frequencies(seq_lens)
        for rule in self.rules:
            inv_freq = rule(inv_freq)
        return inv_freq, scaling


class TableForward:
    """The ``forward`` a patched learned table gets: ``embed(table, position_ids)``. A class rather than a closure,
    so a deep copy reads the copy's own table and ``torch.save(model)`` can pickle it."""

    def __init__(self, table: torch.nn.Module, embed, positions_keyword: str | None):
        self.table, self.embed, self.positions_keyword = table, embed, positions_keyword

    def __call__(self, *args, **kwargs):
        positions = kwargs[self.positions_keyword] if self.positions_keyword else args[0]  # archs.ArchSpec says which
        return self.embed(self.table, positions)


class WithoutRotation:
    """The forward pre-hook of a position-free attention module: it replaces the ``position_embeddings`` the
    decoder layer hands over with cos 1, sin 0, so the module's queries and keys stay unrotated."""

    def __call__(self, module, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            raise PosSwapError(
                f"{type(module).__name__} was called without the keyword position_embeddings, which pos_swap "
                f"replaces to switch its rotation off; this transformers version calls it differently."
            )
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin))}


def zero_rows(table: torch.nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """A learned table switched off: zeros ``(*positions.shape, D)``."""
    return table.weight.new_zeros(*positions.shape, table.weight.shape[-1])


def _follow(old, current):
    """``old`` cast to the floating dtype and moved to the device of ``current`` when both are plain tensors."""
    if not isinstance(old, torch.Tensor) or not isinstance(current, torch.Tensor) or isinstance(old, torch.nn.Parameter):
        return old
    dtype = current.dtype if old.is_floating_point() and current.is_floating_point() else old.dtype
    return old.to(device=current.device, dtype=dtype)


def refuse_while_observed(model: torch.nn.Module, action: str) -> None:
    """Refuse to patch or unpatch a model inside its ``pos_swap.observe`` block: the block's exit restores what it
    found, so the change would be half undone (the record saying one scheme, the attention another)."""
    if model.__dict__.get(OBSERVED_ATTR):
        raise PosSwapError(
            f"Cannot {action} this model inside a pos_swap.observe block: leaving the block would half undo it. "
            f"{action.capitalize()} before the `with pos_swap.observe(...)` block or after it."
        )


def current_patch(model: torch.nn.Module) -> Patch | None:
    return resolve(model).__dict__.get(PATCH_ATTR)


def patch(model: torch.nn.Module, scheme: str, *, replace: bool = False, **params) -> Patch:
    """Put ``scheme`` on ``model`` in place and return the handle; ``handle.remove()`` undoes it. ``params`` are
    the scheme's parameters and the modifiers' keywords (``temperature="logn"``, ``resonance=True``; see
    :mod:`pos_swap.modifiers`), which compose with any scheme.

    Everything is validated before the model is touched: a patch being replaced is taken off first (the new
    scheme's defaults read the native model) and put back, its very objects, if the new one fails. A model carries
    one patch at a time: patching again raises unless ``replace=True``.
    """
    model = resolve(model)
    refuse_while_observed(model, "patch")
    get_scheme(scheme).check_family(model, archs.lookup(model).family)
    previous = current_patch(model)
    if previous is not None and not replace:
        raise AlreadyPatchedError(
            f"This model already carries pos_swap scheme '{previous.scheme.name}'. Remove it first "
            f"(pos_swap.unpatch(model)) or pass replace=True."
        )
    undone = previous._undo_all() if previous is not None else []
    handle = None
    try:
        handle = Patch(model, *configure(model, scheme, params))
        handle._apply()
    except BaseException:
        if handle is not None:
            handle._undo_all()
        if previous is not None:
            previous._redo(undone)  # the previous patch's very objects, trained parameters included
        raise
    return handle


def configure(model: torch.nn.Module, scheme: str, params: dict) -> tuple[Scheme, tuple[Modifier, ...]]:
    """The scheme and modifiers :func:`patch` would put on ``model`` with ``params``, checked (family, parameter
    names, types, ranges, the checks against the model's config) without changing the model: what a command
    checks on the model's skeleton before its weights load."""
    scheme_class = get_scheme(scheme)
    scheme_class.check_family(model, archs.lookup(model).family)
    params, modifier_params = split_modifiers(params)
    configured = scheme_class.configure(model, params)
    stacked = (m.configure(model, own) for m, own in modifier_params.items())
    return configured, tuple(m for m in stacked if m is not None)


def scheme_check(scheme: str | None, params: dict):
    """A check for :func:`pos_swap.loading.load` (``check=``): :func:`configure` on the model's skeleton, so that a
    scheme that does not fit, or a parameter value it refuses, stops a command before the weights load (None: no
    scheme, nothing to check)."""
    if scheme is None:
        return None
    return lambda tokenizer, skeleton: configure(skeleton, scheme, params)


def unpatch(model: torch.nn.Module) -> None:
    """Remove the model's patch; its outputs are then bit-identical to before."""
    handle = current_patch(model)
    if handle is None:
        raise NotPatchedError("This model carries no pos_swap patch; nothing to remove.")
    handle.remove()


@contextlib.contextmanager
def patched(model: torch.nn.Module, scheme: str, **params):
    """``with pos_swap.patched(model, "dynamic", factor=2.0):`` the patch holds inside the block only. The block
    may unpatch or re-patch (``replace=True``) the model itself: on exit, whatever patch it carries is removed."""
    handle = patch(model, scheme, **params)
    try:
        yield handle
    finally:
        if current_patch(model) is not None:
            unpatch(model)


@contextlib.contextmanager
def unpatched(model: torch.nn.Module):
    """``with pos_swap.engine.unpatched(model):`` the model without its patch (e.g. one a folder was saved with)
    inside the block; on exit a patch put on inside is removed and the original one, its very objects (trained
    tables included), is put back."""
    handle = current_patch(model)
    undone = handle._undo_all() if handle is not None else []
    try:
        yield
    finally:
        if current_patch(model) is not None:
            unpatch(model)
        if handle is not None:
            handle._redo(undone)


@contextlib.contextmanager
def observe(model: torch.nn.Module, *observers):
    """``with pos_swap.observe(model, observer):`` every attention module shows ``observer`` the attention it really
    computes, under the model's patch (ALiBi's bias, a dynamic rotation, Self-Extend's grouped positions) and
    backend (eager or sdpa), without storing an L x L matrix and without changing any output.

    An observer has ``queries_keys(module, query, key)`` (the final, rotated queries and keys of one call) and
    ``probabilities(module, probs, rows, cols, (Lq, Lk))`` (float32 probabilities ``(B, H, C, W)`` of a block
    of query rows, their indices ``rows (C,)``, against keys ``cols``, a slice from 0). An observer with a
    ``query_rows`` attribute (an int) is shown an evenly spaced sample of that many rows per call. An unpatched model is routed through pos_swap's attention function as a pass-through; a patch is
    left as it is. Everything is undone on exit, also on error; patching or unpatching inside the block is refused.
    """
    changes = Patch(resolve(model), scheme=None)  # an undo stack only
    try:
        changes.set(changes.model, OBSERVED_ATTR, True)
        changes.own_config()
        changes.route_attention()
        for module in archs.attention_modules(model):
            changes.set(module, OBSERVERS, observers_of(module) + observers)
        yield
    finally:
        changes._undo_all()


def causal_consistent(model: torch.nn.Module) -> bool:
    """Whether each token's output depends only on the tokens up to it under the model's current patch (its
    scheme's declaration) or, unpatched, its own rotary (transformers' ``dynamic``/``longrope`` follow the window)."""
    handle = current_patch(model)
    if handle is not None:
        return handle.scheme.causal_consistent()
    return not archs.follows_length(model)


def describe(model: torch.nn.Module) -> dict | None:
    """The model's current patch as ``{"scheme", "params", "version"}`` (and ``"modifiers"`` when it has any), or
    None when unpatched."""
    handle = current_patch(model)
    return copy.deepcopy(handle.record) if handle else None


def saved_model_class(config):
    """The transformers model class named in the config's ``architectures``; ``AutoModel`` (with a warning) when
    the name is missing or not a model class."""
    import transformers

    name = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class
    if name is not None:
        warnings.warn(
            f"config.json names architecture {name!r}, which is not a transformers model class; loading with "
            f"AutoModel (the bare model, without a head). Pass auto_class=... to choose the class.",
            stacklevel=3,
        )
    return transformers.AutoModel


def read_record(config) -> dict | None:
    """Take the pos_swap record off a loaded config and check it: ``{"scheme": str, "params": dict, ...}``. A
    record written by a newer pos_swap loads with a warning."""
    record = vars(config).pop(RECORD_KEY, None)
    if record is None:
        return None
    if not (isinstance(record, dict) and isinstance(record.get("scheme"), str) and isinstance(record.get("params"), dict)):
        raise PosSwapError(
            f"The config's '{RECORD_KEY}' entry is malformed: {record!r}. It should read "
            f"{{\"scheme\": NAME, \"params\": {{...}}, \"version\": ...}}. Re-save the patched model with "
            f"model.save_pretrained(DIR), or delete the entry from config.json to load the unpatched model."
        )
    saved_version = record.get("version")
    try:
        newer = Version(str(saved_version)) > Version(__version__)
    except InvalidVersion:
        newer = True
    if newer:
        warnings.warn(
            f"This folder was saved by pos_swap {saved_version}, newer than the installed {__version__}; its patch "
            f"may not load as it was saved. Upgrade pos_swap (pip install -U pos-swap).",
            stacklevel=3,
        )
    return record


def _load_patch_state(model, path, hub_kwargs: dict) -> None:
    """Load the patch's own trained parameters (state-dict keys with ``.pos_swap.``: CoPE tables, trainable ALiBi
    slopes) from the checkpoint's safetensors files. transformers loaded the model before the patch existed, so it
    dropped them as unexpected and the re-applied patch starts freshly initialised."""
    expected = {name for name in model.state_dict() if f".{HOOK}." in name}
    if not expected:
        return
    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    files = set(json.loads(Path(index).read_text())["weight_map"].values()) if index else {"model.safetensors"}
    subset = {}
    for name in sorted(files):
        with safe_open(cached_file(path, name, **hub_kwargs), framework="pt") as weights:
            subset.update({key: weights.get_tensor(key) for key in weights.keys() if key in expected})
    missing = sorted(expected - subset.keys())
    if missing:
        raise PosSwapError(
            f"The checkpoint at '{path}' lacks the trained parameters of its pos_swap patch: {', '.join(missing)}. "
            f"Save the patched model with model.save_pretrained(...) to store them."
        )
    model.load_state_dict(subset, strict=False)


def from_pretrained(path, *, auto_class=None, **kwargs) -> torch.nn.Module:
    """Load a model saved from a patched one and re-apply its patch. ``kwargs`` go to ``from_pretrained``;
    the model class is the saved ``architectures`` entry unless ``auto_class`` is given."""
    import transformers

    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(path, **hub_kwargs)
    record = read_record(config)
    if record is not None and "native_rope_parameters" in record:
        config.rope_parameters = record["native_rope_parameters"]  # the patch re-applies the scheme on top
    model = (auto_class or saved_model_class(config)).from_pretrained(path, config=config, **kwargs)
    if record is not None:
        reapply(model, record)
        _load_patch_state(model, path, hub_kwargs)
    return model


def reapply(model: torch.nn.Module, record: dict) -> Patch:
    """Put the patch a record (:func:`describe`, a saved config) describes back on ``model``."""
    return patch(model, record["scheme"], **record["params"], **record.get("modifiers", {}))


def plain_rope_parameters(model: torch.nn.Module, scheme: Scheme) -> dict | None:
    """The config ``rope_parameters`` under which plain transformers builds the same model as ``scheme`` does on
    ``model``, or None when transformers has no such form (or the config class refuses it, as Phi-3's does)."""
    config = model.config
    slots = archs.rotary_slots(model)
    exported = {slot.layer_type: scheme.hf_rope_parameters(config, slot) for slot in slots}
    if not slots or None in exported.values():
        return None
    # native keys the model reads besides the frequencies (Ministral 3's attention reads the Llama 4 scaling pair)
    keep = ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings", "llama_4_scaling_beta")
    params = copy.deepcopy(config.rope_parameters)
    for slot in slots:
        native = slot.rope_parameters(config)
        target = {**{k: native[k] for k in keep if k in native}, **exported[slot.layer_type]}
        params = {**params, slot.layer_type: target} if slot.layer_type else target
    probe = copy.copy(config)
    probe.rope_parameters = params
    try:
        probe.validate_rope()
    except (ValueError, KeyError, TypeError):
        return None
    return params


def export_hf(model: torch.nn.Module, out_dir) -> Path:
    """Save a patched model as plain transformers ``rope_parameters``: it then loads with no plugin installed.

    Raises when the scheme has no transformers equivalent (its patch needs pos_swap at run time).
    """
    model = resolve(model)
    handle = current_patch(model)
    if handle is None:
        raise NotPatchedError("export_hf needs a patched model; patch it first.")
    config = model.config
    if getattr(config, RECORD_KEY)["plain_transformers"] != SAME_MODEL:
        raise PosSwapError(
            f"Scheme '{handle.scheme.name}' has no plain transformers rope_parameters; save it with "
            f"model.save_pretrained(...) and load it with pos_swap.from_pretrained(...) instead."
        )
    plain = copy.deepcopy(config)
    vars(plain).pop(RECORD_KEY, None)
    plain._attn_implementation = config._attn_implementation.removeprefix(PREFIX)
    model.config = plain
    try:
        model.save_pretrained(out_dir)
    finally:
        model.config = config
    return Path(out_dir)

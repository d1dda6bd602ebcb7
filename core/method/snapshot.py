"""The read-only part of an engine: a model's prunable weights ranked once, shareable by every session.

Nothing here depends on a setting, so one :class:`WeightSnapshot` serves any number of
:class:`core.method.engine.Engine` objects on the same model (the app keeps one per model
and process; each user session adds only its own working buffer). Per prunable weight:

* the original weight is **the model's own tensor**, read and never written (no copy): the
  snapshot's template shares the model's parameters (``_plain_copy``), and a weight changed
  in place afterwards (its version counter moved) is an error, not a silently different
  snapshot;
* ``order``: rank → flat index, ranks by ascending |W| (stable sort), int32 (int64 only for a
  weight of 2³¹ elements or more). #{|W| < t} is a binary search along the ranks: a float's
  bits without the sign bit order like its magnitude, so the search compares integers read
  through ``order``, first on every ``RANK_STRIDE``-th rank, then within one stride;
* ``chunks``: the weight quantized at each bit-width, codes in rank order, built on first
  use under a lock and then shared.

That is 1× the fp32 weights (int32 ranks; plus the chunks in use) on top of the model itself,
against 2× when the snapshot kept its own copy of the weights in rank order and 5× for an
engine that also kept the sorted magnitudes and int64 ranks. A weight that is not one of the
model's tensors (the effective ``_orig * _mask`` of a ``torch.nn.utils.prune`` hook) is held
by the snapshot and counted in :attr:`RankedLayer.nbytes`.
"""
from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from core.method.pruning import PrunableLayer, check_finite, is_norm_layer, prunable_layers
from core.method.quantization import Chunk

RANK_STRIDE = 256  # ranks between two entries of the coarse search table (1/256 of the ranks, as integers)
_BITS_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # float width → integer of the same width
_NUMPY_FLOATS = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for an inference tensor (which has none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class RankedLayer:
    """One prunable weight ranked by |W|: the immutable data every engine on the model reads.

    ``owns_weight``: False when the weight is the model's own tensor (then it costs the snapshot
    nothing), True when the snapshot computed it (a pruning hook's ``_orig * _mask``).
    """

    def __init__(self, layer: PrunableLayer, macs_per_weight: float, owns_weight: bool = True):
        weight = layer.weight.detach()
        flat = weight.reshape(-1)
        check_finite(flat, f"layer '{layer.name}'")
        if flat.element_size() not in _BITS_OF or not flat.is_floating_point():
            raise TypeError(f"layer '{layer.name}': weights of dtype {flat.dtype} cannot be ranked")
        self.name, self.kind = layer.name, layer.kind
        # where the weight lives: module path and attribute ("weight", or e.g. "in_proj_weight"); its state_dict key
        self.module_path, self.param, self.key = layer.module_path, layer.param, layer.parameter_name
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.numel = flat.numel()
        self.channels = self.shape[0] if len(self.shape) >= 2 else 1
        self.is_norm = is_norm_layer(layer.module)
        self.requires_grad = layer.weight.requires_grad
        self.macs_per_weight = macs_per_weight
        self.owns_weight = owns_weight or flat.data_ptr() != weight.data_ptr()  # reshape copied a strided weight
        self._flat = flat  # the original weight, flat (the model's own storage unless owns_weight); never written
        self._version = _version_of(flat)
        _, order = torch.sort(flat.abs(), stable=True)
        self.order = order.to(torch.int32) if self.numel < 2 ** 31 else order
        self._order_np = self.order.numpy()
        self._bits = flat.view(_BITS_OF[flat.element_size()]).numpy()  # the same storage, read as integers
        self._magnitude_mask = (1 << (8 * flat.element_size() - 1)) - 1  # every bit but the sign
        self._numpy_dtype = _NUMPY_FLOATS.get(self.dtype)
        self._coarse = self._keys(0, self.numel, RANK_STRIDE)
        self.max_abs = flat[order[-1]].abs() if self.numel else flat.new_zeros(())
        self.chunks: dict[int, Chunk] = {}
        self._chunk_lock = threading.Lock()

    def _check_unchanged(self) -> None:
        if self._version is not None and _version_of(self._flat) != self._version:
            raise RuntimeError(f"the weight of layer '{self.name}' was changed in place after the engine ranked it; "
                               "build a new Engine for the changed model (or give the Engine a copy)")

    def _original_flat(self) -> torch.Tensor:
        self._check_unchanged()
        return self._flat

    def _keys(self, start: int, stop: int, step: int = 1) -> np.ndarray:
        """|W| of ranks ``start:stop:step`` as integers that order like the magnitudes (the bits but the sign)."""
        return self._bits[self._order_np[start:stop:step]] & self._magnitude_mask

    def count_below(self, threshold: torch.Tensor) -> int:
        """#{|W| < threshold}: the first rank with |W| ≥ threshold (threshold rounded to the weight's dtype)."""
        self._check_unchanged()
        if self._numpy_dtype is not None:  # numpy rounds a double to the weight's dtype as torch does (to nearest)
            value = self._numpy_dtype(float(threshold))
            bits = int(value.view(self._bits.dtype))
        else:  # bfloat16: numpy has no such float
            value = threshold.reshape(()).to(self.dtype)
            bits = int(value.view(_BITS_OF[value.element_size()]).item())
        if not value > 0:  # no |W| is below 0, a negative threshold or NaN
            return 0
        key = bits & self._magnitude_mask
        stride = int(np.searchsorted(self._coarse, key, side="left"))  # ranks < (stride−1)·S are below, stride·S not
        if stride == 0:
            return 0
        start, stop = (stride - 1) * RANK_STRIDE + 1, min(stride * RANK_STRIDE, self.numel)
        return start + int(np.searchsorted(self._keys(start, stop), key, side="left"))

    def index(self, start: int, stop: int) -> torch.Tensor:
        """Flat indices of ranks ``start:stop`` as int64 (what ``index_copy_`` takes)."""
        return self.order[start:stop].long()

    def original(self) -> torch.Tensor:
        """A copy of the original weight."""
        return self._original_flat().clone().view(self.shape)

    def ranked_values(self) -> torch.Tensor:
        """The signed weights in rank order (|·| ascending; a new tensor)."""
        return self._original_flat().index_select(0, self.order.long())

    def sorted_magnitudes(self) -> torch.Tensor:
        """|W| in ascending order (a new tensor)."""
        return self.ranked_values().abs_()

    def magnitude_at(self, rank: int) -> float:
        """|W| of the weight at ``rank``."""
        return float(self._original_flat()[int(self.order[rank])].abs())

    def chunk(self, bits: int) -> Chunk:
        """The weight quantized at ``bits``, codes in rank order (built once, shared)."""
        chunk = self.chunks.get(bits)
        if chunk is None:
            with self._chunk_lock:
                chunk = self.chunks.get(bits)
                if chunk is None:
                    chunk = self.chunks[bits] = Chunk.build(self._original_flat().view(self.shape), self.order, bits)
        return chunk

    def values(self, source_bits: int | None, start: int, stop: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """Weights of ranks ``start:stop``: the originals (``None``) or decoded from a chunk.

        ``index``: :meth:`index` of the same ranks, where the caller has it already.
        """
        if source_bits is None:
            return self._original_flat().index_select(0, self.index(start, stop) if index is None else index)
        return self.chunk(source_bits).decode_ranks(self.order, start, stop, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held: the rank order, the chunks built so far, and the weight where it is not the model's own."""
        own = self._flat.numel() * self._flat.element_size() if self.owns_weight else 0
        return own + self.order.numel() * self.order.element_size() + sum(c.nbytes for c in self.chunks.values())


def _sequence_length(module: nn.MultiheadAttention, tensor: object) -> int | None:
    """Positions per sample of an attention input: (L, N, E), (N, L, E) with ``batch_first``, or unbatched (L, E)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (2, 3) or tensor.is_nested:
        return None
    return tensor.shape[1 if tensor.dim() == 3 and module.batch_first else 0]


def _macs_per_weight(model: nn.Module, layers: list[PrunableLayer], example_input: torch.Tensor | None) -> dict[str, float]:
    """How often each weight is used per sample: output positions (conv), 1 (linear), tokens (attention).

    Conv/Linear (and norm) weights from a forward hook on their module. ``nn.MultiheadAttention``
    multiplies by its projections inside its own forward (its ``out_proj`` module is never called),
    so a hook on the attention module reads the query length L and key length S: ``q_proj_weight``
    and ``out_proj`` are used L times, ``k_proj_weight``/``v_proj_weight`` S times, the packed
    ``in_proj_weight`` (Q, K and V stacked) (L + 2S)/3 times on average. A weight no hook saw
    (never called, or a parameter of a graph module) counts 0: no compute measured.
    """
    if example_input is None:
        return {layer.name: 1.0 for layer in layers}
    outputs: dict[str, tuple[int, ...]] = {}
    lengths: dict[str, tuple[int | None, int | None]] = {}  # attention module path → (L, S)

    def attention_hook(module, args, kwargs, out, path):
        query = args[0] if args else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key", query)
        lengths[path] = (_sequence_length(module, query), _sequence_length(module, key))

    hooks = [layer.module.register_forward_hook(
        lambda module, args, out, name=layer.name: outputs.__setitem__(name, tuple(out.shape)))
        for layer in layers if layer.param == "weight"]
    hooks += [module.register_forward_hook(lambda m, a, k, o, path=path: attention_hook(m, a, k, o, path),
                                           with_kwargs=True)
              for path, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(example_input)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    result = {}
    for layer in layers:
        shape = outputs.get(layer.name)
        if layer.param != "weight" or shape is None:
            result[layer.name] = _attention_uses(layer, lengths)
            continue
        per_sample = math.prod(shape[1:])
        weight = layer.weight
        result[layer.name] = per_sample / (weight.numel() if is_norm_layer(layer.module) else weight.shape[0])
    return result


def _attention_uses(layer: PrunableLayer, lengths: dict[str, tuple[int | None, int | None]]) -> float:
    """Uses per sample of an attention projection (see :func:`_macs_per_weight`); 0.0 where none was seen."""
    if layer.param == "weight":  # an attention's out_proj: called by the attention's forward, not as a module
        owner, _, child = layer.name.rpartition(".")
        query, _ = lengths.get(owner, (None, None)) if child == "out_proj" else (None, None)
        return float(query) if query is not None else 0.0
    query, key = lengths.get(layer.module_path, (None, None))
    if query is None or key is None:
        return 0.0
    if layer.param == "in_proj_weight":  # rows [0, E) meet the query, rows [E, 3E) the key and the value
        return (query + 2 * key) / 3
    return float(query if layer.param == "q_proj_weight" else key)


def _plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules, sharing its parameters, with every pruning reparametrization made permanent.

    The copy holds the model's own Parameter objects (it is read, never written or moved), except
    for a pruning hook's ``<name>_orig``, which ``prune.remove`` rewrites and which is copied.

    A pruned module holds its masked tensor as a plain attribute computed from
    ``<name>_orig * <name>_mask`` (not a graph leaf, so ``deepcopy`` refuses it, and stale
    when ``_orig`` changed since the last forward). The copy takes a detached alias in its
    place, then ``prune.remove`` on the copy sets ``<name>`` to a Parameter holding
    ``_orig * _mask`` and drops the hook, ``_orig`` and ``_mask``; ``model`` is not touched.
    """
    hooked = [(path, module, hook._tensor_name) for path, module in model.named_modules()
              for hook in module._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)]
    memo = {id(masked): masked.detach() for _, module, name in hooked
            if isinstance(masked := module.__dict__.get(name), torch.Tensor)}
    rewritten = {id(getattr(module, f"{name}_orig")) for _, module, name in hooked}
    memo.update({id(p): p for p in model.parameters() if id(p) not in rewritten})
    copied = copy.deepcopy(model, memo)
    for path, _, name in hooked:
        prune.remove(copied.get_submodule(path), name)
    return copied


def _dense_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer with floats counted as fp32."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
    return total


class WeightSnapshot:
    """A model's prunable weights ranked once, and the rest of the model as a template; read-only.

    ``layers``: restrict pruning to these layer names (Conv/Linear modules, attention projections;
    see :func:`core.method.pruning.prunable_layers`). ``example_input``: one
    input batch, used once to weight compute by MACs. The model is copied first (pruning
    hooks made permanent on the copy, see :func:`_plain_copy`) and never run or modified.
    """

    def __init__(self, model: nn.Module, *, layers: Iterable[str] | None = None,
                 example_input: torch.Tensor | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Engine needs a torch.nn.Module, got {type(model).__name__}")
        with torch.no_grad():
            template = _plain_copy(model)
        models_own = {id(p) for p in model.parameters()}
        weight_layers = prunable_layers(template, include_norm=False, layers=layers)
        norm_layers = [layer for layer in prunable_layers(template, include_norm=True) if is_norm_layer(layer.module)]
        all_layers = weight_layers + norm_layers
        macs = _macs_per_weight(template, all_layers, example_input)
        self.layers: dict[str, RankedLayer] = {
            layer.name: RankedLayer(layer, macs[layer.name], owns_weight=id(layer.weight) not in models_own)
            for layer in all_layers}
        self.dense_bytes = _dense_bytes(template)
        self.other_bytes = self.dense_bytes - sum(layer.numel * 4 for layer in self.layers.values())
        for layer in all_layers:  # the template keeps everything but the prunable weights
            setattr(layer.module, layer.param, nn.Parameter(torch.empty(0, dtype=layer.weight.dtype),
                                                            requires_grad=False))
        self.template = template.eval()

    def layer(self, name: str) -> RankedLayer:
        if name not in self.layers:
            raise KeyError(f"no prunable layer named '{name}'")
        return self.layers[name]

    def build_model(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """A new module: the template with ``weights`` (layer name → tensor) as its prunable weights."""
        model = copy.deepcopy(self.template)
        for name, tensor in weights.items():
            layer = self.layers[name]
            setattr(model.get_submodule(layer.module_path), layer.param,
                    nn.Parameter(tensor, requires_grad=layer.requires_grad))
        return model.eval()

    @property
    def nbytes(self) -> int:
        """Bytes held by the rank orders, chunks and weights not shared with the model (see :attr:`RankedLayer.nbytes`;
        the template's other tensors, shared with the model, excluded)."""
        return sum(layer.nbytes for layer in self.layers.values())

"""The read-only part of an engine: a model's prunable weights ranked once, shareable by every session.

Nothing here depends on a setting, so one :class:`WeightSnapshot` serves any number of
:class:`core.method.engine.Engine` objects on the same model (the app keeps one per model
and process; each user session adds only its own working buffer). Per prunable weight:

* ``ranked``: the signed weights in rank order, ranks by ascending |W| (stable sort), so
  |ranked| is ascending and #{|W| < t} is a binary search on it;
* ``order``: rank → flat index, int32 (int64 only for a weight of 2³¹ elements or more);
* ``chunks``: the weight quantized at each bit-width, codes in rank order, built on first
  use under a lock and then shared.

That is 2× the fp32 weights (plus the chunks in use), against 5× for an engine that also
kept the originals, the sorted magnitudes and int64 ranks. The original weights are
recovered exactly from ``ranked`` and ``order`` when needed (histograms, quantizing a chunk).
"""
from __future__ import annotations

import bisect
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


class RankedLayer:
    """One prunable weight ranked by |W|: the immutable data every engine on the model reads."""

    def __init__(self, layer: PrunableLayer, macs_per_weight: float):
        weight = layer.weight.detach()
        flat = weight.reshape(-1)
        check_finite(flat, f"layer '{layer.name}'")
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
        _, order = torch.sort(flat.abs(), stable=True)
        self.ranked = flat[order].contiguous()  # signed weights in rank order
        self.order = order.to(torch.int32) if self.numel < 2 ** 31 else order
        # for the binary search (|·| ascending): a view where numpy has the dtype, else an fp32 copy
        numpy_ok = self.dtype in (torch.float16, torch.float32, torch.float64)
        self._magnitudes: np.ndarray = (self.ranked if numpy_ok else self.ranked.float()).numpy()
        self.max_abs = self.ranked[-1].abs() if self.numel else flat.new_zeros(())
        self.chunks: dict[int, Chunk] = {}
        self._chunk_lock = threading.Lock()

    def count_below(self, threshold: torch.Tensor) -> int:
        """#{|W| < threshold}: the first rank with |W| ≥ threshold (threshold in the weight's dtype)."""
        value = threshold.reshape(()).to(self.dtype).item()
        return bisect.bisect_left(self._magnitudes, value, key=abs)

    def index(self, start: int, stop: int) -> torch.Tensor:
        """Flat indices of ranks ``start:stop`` as int64 (what ``index_copy_`` takes)."""
        return self.order[start:stop].long()

    def original(self) -> torch.Tensor:
        """The original weight, rebuilt exactly from ``ranked`` and ``order`` (a new tensor)."""
        flat = torch.empty(self.numel, dtype=self.dtype)
        flat.index_copy_(0, self.index(0, self.numel), self.ranked)
        return flat.view(self.shape)

    def sorted_magnitudes(self) -> torch.Tensor:
        """|W| in ascending order (a new tensor)."""
        return self.ranked.abs()

    def chunk(self, bits: int) -> Chunk:
        """The weight quantized at ``bits``, codes in rank order (built once, shared)."""
        chunk = self.chunks.get(bits)
        if chunk is None:
            with self._chunk_lock:
                chunk = self.chunks.get(bits)
                if chunk is None:
                    chunk = self.chunks[bits] = Chunk.build(self.original(), self.order, bits)
        return chunk

    def values(self, source_bits: int | None, start: int, stop: int) -> torch.Tensor:
        """Weights of ranks ``start:stop``: the originals (``None``) or decoded from a chunk."""
        if source_bits is None:
            return self.ranked[start:stop]
        return self.chunk(source_bits).decode_ranks(self.order, start, stop, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held: ranked weights, rank order and the chunks built so far."""
        return (self.ranked.numel() * self.ranked.element_size() + self.order.numel() * self.order.element_size()
                + sum(chunk.nbytes for chunk in self.chunks.values()))


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
    """A deep copy of ``model`` with every ``torch.nn.utils.prune`` reparametrization made permanent.

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
        weight_layers = prunable_layers(template, include_norm=False, layers=layers)
        norm_layers = [layer for layer in prunable_layers(template, include_norm=True) if is_norm_layer(layer.module)]
        all_layers = weight_layers + norm_layers
        macs = _macs_per_weight(template, all_layers, example_input)
        self.layers: dict[str, RankedLayer] = {layer.name: RankedLayer(layer, macs[layer.name]) for layer in all_layers}
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
        """Bytes held by the ranked weights, rank orders and chunks (the template's other tensors excluded)."""
        return sum(layer.nbytes for layer in self.layers.values())

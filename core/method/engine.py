"""The compression session shared by the app and the CLIs.

``Engine(model)`` snapshots the model's prunable weights once and never touches the
user's module again. ``Engine.apply(config)`` returns a :class:`CompressionResult`: a
compressed copy of the model plus per-layer statistics.

How a setting is applied (per layer, weights ranked once at load by ascending |W|):

* pruning keeps ``|W| ≥ β``, i.e. the ranks ``[p, N)`` where ``p = #{|W| < β}``
  (a binary search in the sorted magnitudes);
* quantization gives ranks ``[h, N)`` the b_high chunk and ``[p, h)`` the b_low chunk,
  ``h = max(p, #{|W| < θ})`` (or, in ``fraction`` mode, the top ``round(θ · kept)`` ranks);
* the engine's working buffer holds the previous setting, so a new setting only rewrites
  the ranks whose source (zero / original / chunk b) changed: a slider step costs time in
  proportion to the weights it changes, not to the model size. Weights kept in both
  settings whose chunk changed are the *switches* M; the time spent writing them is
  T_switch.

The result's model is materialized on first access (a copy of the buffer), so results are
independent objects and moving a slider back gives bit-identical weights.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import prune

from core.method.config import CompressionConfig
from core.method.pruning import PrunableLayer, boundary, check_finite, is_norm_layer, prunable_layers
from core.method.quantization import DEFAULT_PALETTE, SUPPORTED_BITS, Chunk, check_bits, layer_storage

# A source of weight values for a range of ranks: zero, the original weights, or a chunk.
ZERO = 0
ORIGINAL = -1  # chunk keys are bit-widths (> 0)


@dataclass(frozen=True)
class LayerSetting:
    """Where a layer's ranks change source: ``[0, p)`` zero, ``[p, h)`` low, ``[h, N)`` high."""

    p: int
    h: int
    low: int
    high: int

    def segments(self, n: int) -> tuple[tuple[int, int, int], ...]:
        return ((0, self.p, ZERO), (self.p, self.h, self.low), (self.h, n, self.high))


class _Layer:
    """A prunable weight's immutable snapshot (ranked once) and its slot in the working buffer."""

    def __init__(self, layer: PrunableLayer, macs_per_weight: float):
        weight = layer.weight.detach()
        flat = weight.reshape(-1).clone()
        check_finite(flat, f"layer '{layer.name}'")
        self.name, self.kind = layer.name, layer.kind
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.numel = flat.numel()
        self.channels = self.shape[0] if len(self.shape) >= 2 else 1
        self.is_norm = is_norm_layer(layer.module)
        self.requires_grad = layer.weight.requires_grad
        self.macs_per_weight = macs_per_weight
        self.original = flat
        magnitude = flat.abs()
        self.sorted_abs, self.order = torch.sort(magnitude, stable=True)
        self.ranked = flat[self.order]  # signed weights in rank order
        self.max_abs = self.sorted_abs[-1] if self.numel else magnitude.new_zeros(())
        self.chunks: dict[int, Chunk] = {}
        self.out = flat.clone()  # working buffer; holds the current setting's weights
        self.setting = LayerSetting(0, 0, ORIGINAL, ORIGINAL)

    def count_below(self, threshold: torch.Tensor) -> int:
        """#{|W| < threshold}: the first rank with |W| ≥ threshold."""
        return int(torch.searchsorted(self.sorted_abs, threshold.reshape(1).to(self.dtype), side="left"))

    def chunk(self, bits: int) -> Chunk:
        if bits not in self.chunks:
            self.chunks[bits] = Chunk.build(self.original.view(self.shape), self.order, bits)
        return self.chunks[bits]

    def values(self, source: int, start: int, stop: int) -> torch.Tensor:
        if source == ORIGINAL:
            return self.ranked[start:stop]
        return self.chunk(source).decode_ranks(self.order, start, stop, self.dtype)

    def write(self, target: torch.Tensor, source: int, start: int, stop: int) -> None:
        index = self.order[start:stop]
        if source == ZERO:
            target.index_fill_(0, index, 0)
        else:
            target.index_copy_(0, index, self.values(source, start, stop))

    def transition(self, new: LayerSetting) -> tuple[int, int, float]:
        """Rewrite only the ranks whose source changed; return (changed, switches, T_switch seconds)."""
        for source in (new.low, new.high):
            if source > 0:
                self.chunk(source)  # quantized once, outside the switch timing
        changed = switches = 0
        t_switch = 0.0
        for a, b, src in new.segments(self.numel):
            for c, d, old in self.setting.segments(self.numel):
                lo, hi = max(a, c), min(b, d)
                if lo >= hi or src == old:
                    continue
                if src != ZERO and old != ZERO:
                    start = time.perf_counter()
                    self.write(self.out, src, lo, hi)
                    t_switch += time.perf_counter() - start
                    switches += hi - lo
                else:
                    self.write(self.out, src, lo, hi)
                changed += hi - lo
        self.setting = new
        return changed, switches, t_switch

    def materialize(self, setting: LayerSetting) -> torch.Tensor:
        """The layer's weights under ``setting``, built from scratch (for results no longer current)."""
        target = torch.empty_like(self.original)
        for a, b, src in setting.segments(self.numel):
            if a < b:
                self.write(target, src, a, b)
        return target


@dataclass
class CompressionResult:
    """A compressed view of the model under ``config``.

    ``stats`` has one row per prunable layer; the scalar fields are model totals over those
    layers (``retention`` ρ = kept/total, ``compute_reduction`` = 1 − kept MACs/total MACs,
    where a conv weight counts once per output position). ``model`` is a separate module in
    eval mode (materialized on first access); ``weights`` maps layer name → compressed tensor.
    """

    config: CompressionConfig
    stats: pd.DataFrame
    retention: float
    param_reduction: float
    compute_reduction: float
    model_bytes_fp32: int
    model_bytes_compressed: int
    switches: int
    t_switch_s: float
    update_s: float
    changed: int
    _engine: "Engine" = field(repr=False)
    _version: int = field(repr=False)
    _settings: dict[str, LayerSetting] = field(repr=False)
    _weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            self._weights = self._engine._snapshot(self._version, self._settings)
        return self._weights

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self._engine._build_model(self.weights)
        return self._model

    @property
    def size_ratio(self) -> float:
        """fp32 bytes / compressed bytes of the whole model."""
        return self.model_bytes_fp32 / max(self.model_bytes_compressed, 1)


def _macs_per_weight(model: nn.Module, layers: list[PrunableLayer], example_input: torch.Tensor | None) -> dict[str, float]:
    """How often each weight is used per sample: output positions (conv), 1 (linear)."""
    if example_input is None:
        return {layer.name: 1.0 for layer in layers}
    outputs: dict[str, tuple[int, ...]] = {}
    hooks = [layer.module.register_forward_hook(
        lambda module, args, out, name=layer.name: outputs.__setitem__(name, tuple(out.shape)))
        for layer in layers]
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
        if shape is None:
            result[layer.name] = 0.0  # never called in the forward pass: no compute
            continue
        per_sample = math.prod(shape[1:])
        weight = layer.weight
        result[layer.name] = per_sample / (weight.numel() if is_norm_layer(layer.module) else weight.shape[0])
    return result


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


class Engine:
    """Non-destructive boundary pruning and mixed-precision chunk switching for one model.

    ``palette``: the bit-widths the chunk store offers (each quantized once, when first
    needed). ``layers``: restrict pruning to these Conv/Linear layer names.
    ``example_input``: one input batch, used once to weight compute by MACs.

    A model pruned with ``torch.nn.utils.prune`` and not ``prune.remove``d (it carries
    pruning forward-pre-hooks, ``<name>_orig`` and ``<name>_mask``) is taken at its
    effective weight ``<name>_orig * <name>_mask`` (what its forward computes), whether or
    not it has run a forward pass since. Results are plain modules: no pruning hooks, a
    normal ``weight`` Parameter. The user's model, its hooks, ``_orig`` and ``_mask``
    included, is never modified.
    """

    def __init__(self, model: nn.Module, *, palette: Iterable[int] = DEFAULT_PALETTE,
                 layers: Iterable[str] | None = None, example_input: torch.Tensor | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Engine needs a torch.nn.Module, got {type(model).__name__}")
        self.palette = tuple(sorted({check_bits(b, SUPPORTED_BITS, "palette bit-width") for b in palette}))
        if not self.palette:
            raise ValueError("the palette needs at least one bit-width")
        self._lock = threading.Lock()
        with torch.no_grad():
            template = _plain_copy(model)  # never run or modify the user's module
        weight_layers = prunable_layers(template, include_norm=False, layers=layers)
        norm_layers = [layer for layer in prunable_layers(template, include_norm=True) if is_norm_layer(layer.module)]
        all_layers = weight_layers + norm_layers
        macs = _macs_per_weight(template, all_layers, example_input)
        self._layers = {layer.name: _Layer(layer, macs[layer.name]) for layer in all_layers}
        self._dense_bytes = _dense_bytes(template)
        prunable_bytes = sum(l.numel * 4 for l in self._layers.values())
        self._other_bytes = self._dense_bytes - prunable_bytes
        for layer in all_layers:  # the template keeps everything but the prunable weights
            layer.module.weight = nn.Parameter(torch.empty(0, dtype=layer.weight.dtype), requires_grad=False)
        self._template = template.eval()
        self._version = 0

    # ------------------------------------------------------------ introspection

    @property
    def layer_names(self) -> list[str]:
        """Names of the Conv/Linear layers pruned by default, in module order."""
        return [name for name, layer in self._layers.items() if not layer.is_norm]

    @property
    def norm_layer_names(self) -> list[str]:
        """Normalisation layers, pruned only with ``include_norm=True`` (the paper's pseudocode)."""
        return [name for name, layer in self._layers.items() if layer.is_norm]

    def original_weight(self, name: str) -> torch.Tensor:
        """A copy of the layer's original weight."""
        layer = self._layer(name)
        return layer.original.view(layer.shape).clone()

    def sorted_magnitudes(self, name: str) -> torch.Tensor:
        """The layer's |W| in ascending order (read-only; do not modify)."""
        return self._layer(name).sorted_abs

    def rank_order(self, name: str) -> torch.Tensor:
        """Flat indices of the layer's weights by ascending |W| (stable; rank → index; read-only).

        A result with ``kept`` and ``n_high`` for this layer keeps ranks ``[numel − kept, numel)``
        and takes ranks ``[numel − n_high, numel)`` from the b_high chunk.
        """
        return self._layer(name).order

    def max_abs(self, name: str) -> float:
        return float(self._layer(name).max_abs)

    def chunk(self, name: str, bits: int) -> Chunk:
        """The layer's chunk at ``bits`` (quantized once, on first use)."""
        check_bits(bits, self.palette)
        return self._layer(name).chunk(bits)

    def chunk_store_bytes(self) -> int:
        """Bytes held by the chunks quantized so far (codes + scales)."""
        return sum(chunk.nbytes for layer in self._layers.values() for chunk in layer.chunks.values())

    def snapshot_bytes(self) -> int:
        """Bytes of the engine's own copies: originals, ranks, sorted magnitudes, working buffer."""
        return sum(t.numel() * t.element_size() for layer in self._layers.values()
                   for t in (layer.original, layer.sorted_abs, layer.order, layer.ranked, layer.out))

    @property
    def dense_bytes(self) -> int:
        return self._dense_bytes

    def _layer(self, name: str) -> _Layer:
        if name not in self._layers:
            raise KeyError(f"no prunable layer named '{name}'")
        return self._layers[name]

    # ------------------------------------------------------------ applying a setting

    def _setting(self, layer: _Layer, config: CompressionConfig, active: bool) -> LayerSetting:
        if not active:
            return LayerSetting(0, 0, ORIGINAL, ORIGINAL)
        p = layer.count_below(boundary(layer.max_abs, config.tau_for(layer.name)))
        if not config.quantized:
            return LayerSetting(p, p, ORIGINAL, ORIGINAL)
        if config.theta_mode == "fraction":
            h = layer.numel - round(config.theta * (layer.numel - p))
        elif config.theta_mode == "relative":
            h = layer.count_below(layer.max_abs * config.theta)
        else:
            h = layer.count_below(torch.tensor(config.theta, dtype=torch.float64))
        return LayerSetting(p, max(p, h), config.b_low, config.b_high)

    def _check(self, config: CompressionConfig) -> None:
        if not isinstance(config, CompressionConfig):
            raise TypeError(f"apply() needs a CompressionConfig, got {type(config).__name__}")
        unknown = [name for name, _ in config.layer_tau if name not in self._layers]
        if unknown:
            raise ValueError(f"per-layer tau names an unknown layer '{unknown[0]}'")
        if config.quantized:
            check_bits(config.b_low, self.palette, "b_low")
            check_bits(config.b_high, self.palette, "b_high")

    def apply(self, config: CompressionConfig) -> CompressionResult:
        """Compress under ``config``; returns a new result (the user's model is never touched)."""
        self._check(config)
        with self._lock:
            start = time.perf_counter()
            rows, settings = [], {}
            total_changed = total_switches = 0
            total_t_switch = 0.0
            for layer in self._layers.values():
                active = config.include_norm or not layer.is_norm
                setting = self._setting(layer, config, active)
                changed, switches, t_switch = layer.transition(setting)
                settings[layer.name] = setting
                total_changed += changed
                total_switches += switches
                total_t_switch += t_switch
                if active:
                    rows.append(self._row(layer, config, setting, switches, t_switch))
            self._version += 1
            update_s = time.perf_counter() - start
            return self._result(config, rows, settings, total_changed, total_switches, total_t_switch, update_s)

    def _row(self, layer: _Layer, config: CompressionConfig, s: LayerSetting,
             switches: int, t_switch: float) -> dict:
        kept = layer.numel - s.p
        n_high = layer.numel - s.h if config.quantized else kept
        n_low = kept - n_high
        tau = config.tau_for(layer.name)
        if config.quantized:
            storage = layer_storage(layer.numel, layer.channels, n_high, n_low, config.b_high, config.b_low)
            theta_abs = float(layer.max_abs) * config.theta if config.theta_mode == "relative" else (
                config.theta if config.theta_mode == "absolute" else float("nan"))
        else:
            storage = layer_storage(layer.numel, layer.channels, kept, 0, None, None,
                                    dense_bits=torch.finfo(layer.dtype).bits)
            theta_abs = float("nan")
        return {
            "name": layer.name, "type": layer.kind, "shape": "×".join(map(str, layer.shape)),
            "numel": layer.numel, "max_abs": float(layer.max_abs), "tau": tau,
            "beta": float(boundary(layer.max_abs, tau)), "kept": kept,
            "retention": kept / layer.numel if layer.numel else 1.0,
            "theta": theta_abs, "n_high": n_high, "n_low": n_low,
            "switches": switches, "t_switch_ms": t_switch * 1e3,
            "macs_per_weight": layer.macs_per_weight,
            "fp32_bytes": layer.numel * 4, "compressed_bytes": storage.total,
        }

    def _result(self, config, rows, settings, changed, switches, t_switch, update_s) -> CompressionResult:
        numel = sum(row["numel"] for row in rows)
        kept = sum(row["kept"] for row in rows)
        retention = kept / numel if numel else 1.0
        macs = sum(row["numel"] * row["macs_per_weight"] for row in rows)
        kept_macs = sum(row["kept"] * row["macs_per_weight"] for row in rows)
        compute_reduction = 1 - kept_macs / macs if macs else 0.0
        # prunable weights this setting leaves alone (norm scales without include_norm) stay fp32
        active = {row["name"] for row in rows}
        untouched = sum(layer.numel * 4 for layer in self._layers.values() if layer.name not in active)
        compressed = self._other_bytes + untouched + sum(row["compressed_bytes"] for row in rows)
        return CompressionResult(
            config=config, stats=pd.DataFrame(rows), retention=retention, param_reduction=1 - retention,
            compute_reduction=compute_reduction, model_bytes_fp32=self._dense_bytes,
            model_bytes_compressed=compressed, switches=switches, t_switch_s=t_switch,
            update_s=update_s, changed=changed, _engine=self, _version=self._version, _settings=settings)

    # ------------------------------------------------------------ materializing results

    def _snapshot(self, version: int, settings: dict[str, LayerSetting]) -> dict[str, torch.Tensor]:
        with self._lock:
            current = version == self._version
            return {
                name: (layer.out.clone() if current else layer.materialize(settings[name])).view(layer.shape)
                for name, layer in self._layers.items()
            }

    def _build_model(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        model = copy.deepcopy(self._template)
        for name, tensor in weights.items():
            module = model.get_submodule(name)
            module.weight = nn.Parameter(tensor, requires_grad=self._layers[name].requires_grad)
        return model.eval()

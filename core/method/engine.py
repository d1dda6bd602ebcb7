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

The result's model is materialized on first access (a copy of the buffer, or the buffer
itself with ``lend_buffers=True``), so results are independent objects and moving a slider
back gives bit-identical weights. The ranked, setting-independent data is a
:class:`core.method.snapshot.WeightSnapshot` that engines on the same model can share.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from core.method.config import CompressionConfig
from core.method.pruning import boundary
from core.method.quantization import DEFAULT_PALETTE, SUPPORTED_BITS, Chunk, check_bits, layer_storage
from core.method.snapshot import RankedLayer, WeightSnapshot

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


class _Slot:
    """One prunable weight of one engine: the shared ranked data and this engine's working buffer."""

    def __init__(self, ranked: RankedLayer):
        self.ranked = ranked
        self.name, self.numel = ranked.name, ranked.numel
        self.out = ranked.original().reshape(-1)  # working buffer; holds the current setting's weights
        self.setting = LayerSetting(0, 0, ORIGINAL, ORIGINAL)
        self.lent_version: int | None = None  # ``out._version`` when the buffer was lent to a result

    def lend(self) -> torch.Tensor:
        """The working buffer itself, for the current result (no copy): see ``Engine(lend_buffers=True)``."""
        self.lent_version = self.out._version
        return self.out

    def reclaim(self) -> None:
        """Before the buffer changes: leave the lent storage to its result and continue on a copy.

        If the result changed the buffer in place since (its version counter moved), the copy
        is rebuilt from the shared ranked data instead of trusting the buffer.
        """
        if self.lent_version is None:
            return
        modified = self.out._version != self.lent_version
        self.out = self.materialize(self.setting) if modified else self.out.clone()
        self.lent_version = None

    def write(self, target: torch.Tensor, source: int, start: int, stop: int) -> None:
        index = self.ranked.index(start, stop)
        if source == ZERO:
            target.index_fill_(0, index, 0)
        else:
            target.index_copy_(0, index, self.ranked.values(None if source == ORIGINAL else source, start, stop, index))

    def transition(self, new: LayerSetting) -> tuple[int, int, float]:
        """Rewrite only the ranks whose source changed; return (changed, switches, T_switch seconds)."""
        for source in (new.low, new.high):
            if source > 0:
                self.ranked.chunk(source)  # quantized once, outside the switch timing
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
        target = torch.empty_like(self.out)
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


class Engine:
    """Non-destructive boundary pruning and mixed-precision chunk switching for one model.

    ``palette``: the bit-widths the chunk store offers (each quantized once, when first
    needed). ``layers``: restrict pruning to these layer names (Conv/Linear modules by their path,
    other weights such as an attention's ``in_proj_weight`` by the parameter's; see
    :func:`core.method.pruning.prunable_layers`).
    ``example_input``: one input batch, used once to weight compute by MACs.

    Memory: the rank orders live in a :class:`WeightSnapshot` (1× the fp32 weights, plus the
    chunks in use; the original weights are the model's own tensors, read and never copied,
    so changing them in place afterwards is an error), which several engines may share
    (``Engine.sharing(snapshot)``: one per app session on the same model); each engine adds
    one working buffer (1×). A result's weights are a copy of that buffer (1× more per
    materialized result) unless ``lend_buffers=True``: then the current result's weights
    *are* the buffer until the next ``apply``, which continues on a copy and leaves the
    storage to the result. A result changed in place through autograd-visible operations is
    detected by the buffer's version counter and the engine rebuilds its buffer from the
    snapshot; writes through ``.data`` are not detected, so lend only where results are
    read-only (the app's sessions).

    A model pruned with ``torch.nn.utils.prune`` and not ``prune.remove``d (it carries
    pruning forward-pre-hooks, ``<name>_orig`` and ``<name>_mask``) is taken at its
    effective weight ``<name>_orig * <name>_mask`` (what its forward computes), whether or
    not it has run a forward pass since. Results are plain modules: no pruning hooks, a
    normal ``weight`` Parameter. The user's model, its hooks, ``_orig`` and ``_mask``
    included, is never modified.
    """

    def __init__(self, model: nn.Module | None = None, *, palette: Iterable[int] = DEFAULT_PALETTE,
                 layers: Iterable[str] | None = None, example_input: torch.Tensor | None = None,
                 snapshot: WeightSnapshot | None = None, lend_buffers: bool = False):
        self.palette = tuple(sorted({check_bits(b, SUPPORTED_BITS, "palette bit-width") for b in palette}))
        if not self.palette:
            raise ValueError("the palette needs at least one bit-width")
        if snapshot is None:
            if model is None:
                raise TypeError("Engine needs a model or a snapshot")
            snapshot = WeightSnapshot(model, layers=layers, example_input=example_input)
        elif model is not None or layers is not None or example_input is not None:
            raise TypeError("give Engine either a model (with layers/example_input) or a snapshot, not both")
        self.snapshot = snapshot
        self.lend_buffers = lend_buffers
        self._lock = threading.Lock()
        self._slots = {name: _Slot(ranked) for name, ranked in snapshot.layers.items()}
        self._version = 0

    @classmethod
    def sharing(cls, snapshot: WeightSnapshot, *, palette: Iterable[int] = DEFAULT_PALETTE,
                lend_buffers: bool = False) -> "Engine":
        """A new engine over a snapshot other engines may read at the same time (one working buffer of its own)."""
        return cls(snapshot=snapshot, palette=palette, lend_buffers=lend_buffers)

    # ------------------------------------------------------------ introspection

    @property
    def layer_names(self) -> list[str]:
        """Names of the weights pruned by default (Conv/Linear, attention projections), in module order."""
        return [name for name, layer in self.snapshot.layers.items() if not layer.is_norm]

    @property
    def norm_layer_names(self) -> list[str]:
        """Normalisation layers, pruned only with ``include_norm=True`` (the paper's pseudocode)."""
        return [name for name, layer in self.snapshot.layers.items() if layer.is_norm]

    def parameter_name(self, name: str) -> str:
        """The state_dict key of layer ``name``'s weight: ``<name>.weight`` for a module's weight, else ``name``
        itself (``….self_attention.in_proj_weight``). Use :func:`core.method.pruning.layer_weight` to find the
        tensor in a model."""
        return self.snapshot.layer(name).key

    def original_weight(self, name: str) -> torch.Tensor:
        """A copy of the layer's original weight."""
        return self.snapshot.layer(name).original()

    def sorted_magnitudes(self, name: str) -> torch.Tensor:
        """The layer's |W| in ascending order (a new tensor)."""
        return self.snapshot.layer(name).sorted_magnitudes()

    def rank_order(self, name: str) -> torch.Tensor:
        """Flat indices of the layer's weights by ascending |W| (stable; rank → index; read-only; int32).

        A result with ``kept`` and ``n_high`` for this layer keeps ranks ``[numel − kept, numel)``
        and takes ranks ``[numel − n_high, numel)`` from the b_high chunk.
        """
        return self.snapshot.layer(name).order

    def max_abs(self, name: str) -> float:
        return float(self.snapshot.layer(name).max_abs)

    def chunk(self, name: str, bits: int) -> Chunk:
        """The layer's chunk at ``bits`` (quantized once, on first use, shared with every engine on the snapshot)."""
        check_bits(bits, self.palette)
        return self.snapshot.layer(name).chunk(bits)

    def chunk_store_bytes(self) -> int:
        """Bytes held by the chunks quantized so far (codes + scales)."""
        return sum(chunk.nbytes for layer in self.snapshot.layers.values() for chunk in layer.chunks.values())

    def snapshot_bytes(self) -> int:
        """Bytes of the engine's data: the (shareable) rank orders, and its own working buffer (chunks excluded)."""
        ranked = sum(layer.nbytes for layer in self.snapshot.layers.values()) - self.chunk_store_bytes()
        return ranked + self.working_bytes()

    def working_bytes(self) -> int:
        """Bytes this engine holds on its own (its working buffer): what one more engine on the snapshot costs."""
        return sum(slot.out.numel() * slot.out.element_size() for slot in self._slots.values())

    @property
    def dense_bytes(self) -> int:
        return self.snapshot.dense_bytes

    # ------------------------------------------------------------ applying a setting

    def _setting(self, layer: RankedLayer, config: CompressionConfig, active: bool) -> LayerSetting:
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
        unknown = [name for name, _ in config.layer_tau if name not in self.snapshot.layers]
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
            for slot in self._slots.values():
                slot.reclaim()
                layer = slot.ranked
                active = config.include_norm or not layer.is_norm
                setting = self._setting(layer, config, active)
                changed, switches, t_switch = slot.transition(setting)
                settings[layer.name] = setting
                total_changed += changed
                total_switches += switches
                total_t_switch += t_switch
                if active:
                    rows.append(self._row(layer, config, setting, switches, t_switch))
            self._version += 1
            update_s = time.perf_counter() - start
            return self._result(config, rows, settings, total_changed, total_switches, total_t_switch, update_s)

    def _row(self, layer: RankedLayer, config: CompressionConfig, s: LayerSetting,
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
        untouched = sum(layer.numel * 4 for layer in self.snapshot.layers.values() if layer.name not in active)
        compressed = self.snapshot.other_bytes + untouched + sum(row["compressed_bytes"] for row in rows)
        return CompressionResult(
            config=config, stats=pd.DataFrame(rows), retention=retention, param_reduction=1 - retention,
            compute_reduction=compute_reduction, model_bytes_fp32=self.snapshot.dense_bytes,
            model_bytes_compressed=compressed, switches=switches, t_switch_s=t_switch,
            update_s=update_s, changed=changed, _engine=self, _version=self._version, _settings=settings)

    # ------------------------------------------------------------ materializing results

    def _snapshot(self, version: int, settings: dict[str, LayerSetting]) -> dict[str, torch.Tensor]:
        with self._lock:
            current = version == self._version
            return {
                name: self._current_weight(slot) if current else slot.materialize(settings[name]).view(slot.ranked.shape)
                for name, slot in self._slots.items()
            }

    def _current_weight(self, slot: _Slot) -> torch.Tensor:
        buffer = slot.lend() if self.lend_buffers else slot.out.clone()
        return buffer.view(slot.ranked.shape)

    def _build_model(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        return self.snapshot.build_model(weights)

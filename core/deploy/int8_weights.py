"""The engine's weight codes on one int8 grid per output channel, and the model a runtime is given.

An int8 runtime multiplies int8 weights with one scale per output channel. The engine holds, per
layer, codes from up to two chunks (b_high and b_low bits, each with its own per-channel scale
``s_b,c = max|W_c| / q_max(b)``, :mod:`core.method.quantization`) and zeros where pruned. Each
channel ``c`` gets one int8 scale ``S_c`` and codes ``Q`` with ``|Q| ≤ 127``:

* the channel uses b_high = 8: ``S_c = s_8,c`` and its 8-bit codes are kept exactly; a b_low
  weight ``q·s_low,c`` becomes ``round(q · s_low,c / S_c)``: exact when ``s_low,c / S_c`` is an
  integer, else rounded (error ≤ S_c / 2, measured and reported per layer);
* the channel uses one bit-width ``b`` < 8 only: ``S_c = s_b,c / k`` with ``k = ⌊127 / q_max(b)⌋``
  (18 for 4 bits), so ``Q = k·q`` is exact;
* pruned weights are code 0 (an exact zero); a channel with no kept weight gets ``S_c = 1``;
* float16 weights (the 16-bit passthrough) are quantized at ``S_c = max|Ŵ_c| / 127`` (rounded).

With the engine's own scales ``s_4,c / s_8,c = 127/7``, which is not an integer, so a channel that
mixes 4- and 8-bit codes rounds its 4-bit weights by at most half an int8 step; the report says
how many weights that is and how large the error.

BatchNorm folding (:func:`fold_batchnorm`) scales output channel ``c`` by
``k_c = γ_c / √(σ²_c + ε)``: the codes keep their magnitude (their sign flips where ``k_c < 0``)
and ``S_c`` becomes ``S_c · |k_c|``, so folding never re-rounds a code.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch
from torch import fx, nn

from core.method.quantization import FLOAT_PASSTHROUGH_BITS, q_max

INT8_MAX = 127


@dataclass(frozen=True)
class Int8Layer:
    """One layer on its int8 grid: ``weight = codes · scales[c]`` (codes int8, scales fp32 per output channel)."""

    codes: torch.Tensor
    scales: torch.Tensor

    def weight(self) -> torch.Tensor:
        """The fp32 weight the int8 codes stand for (what ONNX's DequantizeLinear computes)."""
        shape = (-1,) + (1,) * (self.codes.ndim - 1)
        return self.codes.to(torch.float32) * self.scales.reshape(shape)


@dataclass(frozen=True)
class Int8Weights:
    """Every quantized layer's int8 form, and the per-layer mapping report.

    ``report`` columns: ``name``, ``kept``, ``exact`` (kept weights whose value the int8 grid
    holds exactly), ``rounded`` (kept weights rounded onto it), ``max_abs_error`` and
    ``rel_error`` (‖Ŵ_int8 − Ŵ‖ / ‖Ŵ‖ over the layer, 0 when every weight is exact).
    """

    layers: dict[str, Int8Layer]
    report: pd.DataFrame

    @property
    def exact(self) -> bool:
        return bool((self.report["rounded"] == 0).all()) if len(self.report) else True


def _channel_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def layer_to_int8(bits: torch.Tensor, codes: torch.Tensor, scales: Mapping[int, torch.Tensor]) -> tuple[Int8Layer, dict]:
    """Map one layer's chunk codes (``bits`` per weight, 0 where pruned; int8 ``codes``; per-bit-width
    per-channel ``scales``) onto one int8 grid per output channel. Returns the layer and its report row."""
    shape = tuple(codes.shape)
    b = _channel_view(bits.to(torch.int64))
    q = _channel_view(codes.to(torch.int64))
    n_channels = b.shape[0]
    value = torch.zeros(b.shape, dtype=torch.float64)
    for width, s in scales.items():
        sel = b == width
        value += torch.where(sel, q.double() * s.double().reshape(-1, 1).expand_as(q) if s.numel() > 1
                             else q.double() * float(s), 0.0)
    if FLOAT_PASSTHROUGH_BITS in set(b.unique().tolist()):
        value += torch.where(b == FLOAT_PASSTHROUGH_BITS, codes.reshape(n_channels, -1).double(), 0.0)
    out_scale = torch.ones(n_channels, dtype=torch.float64)
    widths = sorted(int(w) for w in b.unique().tolist() if w != 0)
    for c in range(n_channels):
        used = [w for w in widths if bool((b[c] == w).any())]
        if not used:
            continue
        top = max(used)
        if top == FLOAT_PASSTHROUGH_BITS or top > 8:
            peak = float(value[c].abs().max())
            out_scale[c] = peak / INT8_MAX if peak > 0 else 1.0
        elif top == 8:
            out_scale[c] = _scale_of(scales[8], c)
        else:  # the widest chunk's codes times k = ⌊127 / q_max⌋ (exact); narrower ones rounded onto it
            out_scale[c] = _scale_of(scales[top], c) / (INT8_MAX // q_max(top))
    scale32 = out_scale.to(torch.float32)
    int8 = torch.round(value / scale32.double().reshape(-1, 1)).clamp_(-INT8_MAX, INT8_MAX)
    # exactly 8-bit codes stay themselves (no float detour)
    keep8 = b == 8
    if keep8.any():
        int8 = torch.where(keep8, q.double(), int8)
    layer = Int8Layer(int8.to(torch.int8).reshape(shape), scale32)
    represented = int8 * scale32.double().reshape(-1, 1)
    error = (represented - value).abs()
    kept = b != 0
    # exact: the value sits on the grid (its code needed no rounding); what remains is the fp32 scale's own rounding
    ratio = value / scale32.double().reshape(-1, 1)
    exact = int((((ratio - int8).abs() <= 1e-3) & kept).sum())
    norm = float(value.norm())
    row = {"kept": int(kept.sum()), "exact": exact, "rounded": int(kept.sum()) - exact,
           "max_abs_error": float(error.max()) if error.numel() else 0.0,
           "rel_error": float((represented - value).norm()) / norm if norm > 0 else 0.0}
    return layer, row


def _scale_of(s: torch.Tensor, c: int) -> float:
    return float(s.reshape(-1)[c] if s.numel() > 1 else s.reshape(-1)[0])


def engine_codes(engine, result) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]]:
    """``{layer: (bits, codes, scales)}`` of a quantized engine result, read from the engine's chunks.

    The engine keeps ranks ``[numel − kept, numel)`` and takes ranks ``[numel − n_high, numel)``
    from the b_high chunk, the rest of the kept ranks from the b_low chunk (:meth:`Engine.rank_order`).
    Norm scales (``include_norm``) are left out: they are not Conv/Linear weights.
    """
    config = result.config
    if not config.quantized:
        return {}
    norms = set(engine.norm_layer_names)
    out = {}
    for row in result.stats.itertuples():
        if row.name in norms:
            continue
        order = engine.rank_order(row.name).to(torch.int64)
        shape = tuple(engine.original_weight(row.name).shape)
        bits = torch.zeros(row.numel, dtype=torch.int8)
        codes = torch.zeros(row.numel, dtype=torch.int8)
        scales = {}
        for width, lo, hi in ((config.b_low, row.numel - row.kept, row.numel - row.n_high),
                              (config.b_high, row.numel - row.n_high, row.numel)):
            if hi <= lo:
                continue
            chunk = engine.chunk(row.name, width)
            bits[order[lo:hi]] = width
            codes[order[lo:hi]] = chunk.codes_ranked[lo:hi].to(torch.int8) if width != FLOAT_PASSTHROUGH_BITS else 0
            scales[width] = chunk.scales if chunk.scales is not None else torch.ones(1)
        out[row.name] = (bits.view(shape), codes.view(shape), scales)
    return out


def to_int8(quantized: Mapping[str, object]) -> Int8Weights:
    """Int8 weights of every layer in ``quantized``: ``{name: (bits, codes, scales)}`` from
    :func:`engine_codes`, or objects with ``bits``/``codes``/``scales`` (a repair's ``QuantizedLayer``)."""
    layers, rows = {}, []
    for name, item in quantized.items():
        bits, codes, scales = item if isinstance(item, tuple) else (item.bits, item.codes, item.scales)
        layer, row = layer_to_int8(bits, codes, scales)
        layers[name] = layer
        rows.append({"name": name, **row})
    columns = ["name", "kept", "exact", "rounded", "max_abs_error", "rel_error"]
    return Int8Weights(layers, pd.DataFrame(rows, columns=columns))


# ---------------------------------------------------------------- the model a runtime is given

def fold_batchnorm(model: nn.Module, int8: Int8Weights | None = None) -> tuple[nn.Module, Int8Weights | None]:
    """A copy of ``model`` (eval) with every BatchNorm that follows a Conv (its only user) folded into it.

    With ``int8``, each layer's weight is set to its int8 codes × scales first, and the folded
    int8 form is returned beside the model (codes sign-flipped where γ/√(σ²+ε) < 0, scales × |k|),
    so that the folded model's weight is exactly ``codes · scales``. Models ``torch.fx`` cannot
    trace are returned unfolded (the runtimes fold BatchNorm themselves in fp32).
    """
    model = copy.deepcopy(model).eval()
    layers = dict(int8.layers) if int8 is not None else {}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            module = modules.get(name)
            if module is None or not hasattr(module, "weight") or tuple(module.weight.shape) != tuple(layer.codes.shape):
                continue
            module.weight.copy_(layer.weight())
    try:
        graph = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any trace failure: export unfolded
        return model, (Int8Weights(layers, int8.report) if int8 is not None else None)
    named = dict(graph.named_modules())
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(named.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv = named.get(source.target)
        if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed:
            continue
        bn = named[node.target]
        if not bn.track_running_stats or bn.running_var is None:
            continue
        with torch.no_grad():
            k = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new_bias = (bias - bn.running_mean) * k + beta
            if source.target in layers:
                old = layers[source.target]
                sign = torch.where(k < 0, -1, 1).to(torch.int8).reshape((-1,) + (1,) * (old.codes.ndim - 1))
                folded = Int8Layer(old.codes * sign, (old.scales * k.abs()).to(torch.float32))
                layers[source.target] = folded
                conv.weight.copy_(folded.weight())
            else:
                conv.weight.copy_(conv.weight * k.reshape((-1,) + (1,) * (conv.weight.ndim - 1)))
            conv.bias = nn.Parameter(new_bias.detach().clone())
        node.replace_all_uses_with(source)
        graph.graph.erase_node(node)
        parent, _, attr = node.target.rpartition(".")
        setattr(graph.get_submodule(parent) if parent else graph, attr, nn.Identity())
    graph.graph.lint()
    graph.recompile()
    return graph.eval(), (Int8Weights(layers, int8.report) if int8 is not None else None)

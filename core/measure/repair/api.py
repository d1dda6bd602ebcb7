"""The repair's entry points (:func:`repair`, :func:`repair_setting`), their inputs and checks, and the held-out error table.

How each method repairs, and what is guaranteed, is in :mod:`core.measure.repair`.
"""
from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping

import pandas as pd
import torch
from torch import nn

from core.measure.accuracy import bn_recalibrate
from core.measure.calibration import calibration_split
from core.measure.repair.steps import repair_in_lockstep
from core.measure.repair.types import METHODS, RepairConfig, RepairResult, raise_if_cancelled
from core.method.pruning import layer_weight, prunable_layers
from core.method.quantization import SUPPORTED_BITS

#: The action of a pruned weight that is not a module's (an attention's ``in_proj_weight``).
ATTENTION_SKIP = "not repaired: an attention projection (multiplied inside nn.MultiheadAttention's forward)"


# ---------------------------------------------------------------- masks and bit-widths

def masks_from_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-mask (``weight != 0``) of every Conv/Linear weight of ``model``."""
    return {layer.name: (layer.weight.detach() != 0).cpu() for layer in prunable_layers(model)}


def bit_widths(engine, result) -> dict[str, torch.Tensor]:
    """Per-weight bit-width (int8; 0 where pruned) of a quantized engine result, from the engine's ranks.

    The engine keeps ranks ``[numel − kept, numel)`` of a layer and takes ranks
    ``[numel − n_high, numel)`` from the b_high chunk (:meth:`Engine.rank_order`); a kept
    weight that quantizes to 0 is still kept here, which is why masks are not read off zeros.
    """
    config = result.config
    if not config.quantized:
        raise ValueError("the result is not quantized (theta is None): there are no bit-widths to respect")
    out = {}
    norms = set(engine.norm_layer_names)
    for row in result.stats.itertuples():
        if row.name in norms:  # include_norm: a BatchNorm scale is not a connection to re-solve
            continue
        order = engine.rank_order(row.name).to(torch.int64)
        flat = torch.zeros(row.numel, dtype=torch.int8)
        flat[order[row.numel - row.kept:row.numel - row.n_high]] = config.b_low
        flat[order[row.numel - row.n_high:]] = config.b_high
        out[row.name] = flat.view(tuple(engine.original_weight(row.name).shape))
    return out


# ---------------------------------------------------------------- per-layer errors on held-out images

def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Images in channels-last memory order (CPU convolutions run ~20% faster); values unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@torch.no_grad()
def layer_errors(dense: nn.Module, models: Mapping[str, nn.Module], images: torch.Tensor, names: list[str],
                 batch_size: int = 128) -> dict[str, dict[str, float]]:
    """``{model key: {layer: ‖y − y_dense‖² / ‖y_dense‖²}}`` of each named layer's output over ``images``."""
    sums = {key: {name: 0.0 for name in names} for key in models}
    norms = {name: 0.0 for name in names}
    modes = [(m, m.training) for m in (dense, *models.values())]
    for m, _ in modes:
        m.eval()
    try:
        for start in range(0, len(images), batch_size):
            x = fast_layout(images[start:start + batch_size])
            reference: dict[str, torch.Tensor] = {}
            hooks = [dense.get_submodule(name).register_forward_hook(
                lambda mod, args, out, name=name: reference.__setitem__(name, out.detach().clone()))
                for name in names]
            try:
                dense(x)
            finally:
                for h in hooks:
                    h.remove()
            for name in names:  # a layer the forward never calls as a module (an attention's out_proj): NaN
                if name in reference:
                    norms[name] += float(reference[name].pow(2).sum(dtype=torch.float64))
            for key, model in models.items():
                def record(mod, args, out, name, key=key):
                    sums[key][name] += float((out - reference[name]).pow(2).sum(dtype=torch.float64))
                hooks = [model.get_submodule(name).register_forward_hook(
                    lambda mod, args, out, name=name, record=record: record(mod, args, out, name)) for name in names]
                try:
                    model(x)
                finally:
                    for h in hooks:
                        h.remove()
    finally:
        for m, mode in modes:
            m.train(mode)
    return {key: {name: sums[key][name] / norms[name] if norms[name] > 0 else float("nan") for name in names}
            for key in models}


# ---------------------------------------------------------------- the entry point

def _check_models(dense: nn.Module, pruned: nn.Module) -> None:
    a, b = dense.state_dict(), pruned.state_dict()
    if a.keys() != b.keys():
        extra = sorted(set(a) ^ set(b))
        raise ValueError(f"the dense and pruned models differ in their tensors (e.g. '{extra[0]}'): "
                         "repair needs the same architecture")
    for key in a:
        if a[key].shape != b[key].shape:
            raise ValueError(f"'{key}' has shape {tuple(a[key].shape)} in the dense model but "
                             f"{tuple(b[key].shape)} in the pruned one")


def _check_masks(pruned: nn.Module, masks: Mapping[str, torch.Tensor] | None,
                 quant: Mapping[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    derived = masks_from_zeros(pruned)
    out = dict(derived)
    bits = None
    if quant is not None:
        bits = {}
        for name, b in quant.items():
            if name not in derived:
                raise ValueError(f"quant names '{name}', which is not a Conv/Linear layer of the model")
            b = torch.as_tensor(b).cpu()
            if tuple(b.shape) != tuple(derived[name].shape):
                raise ValueError(f"quant['{name}'] has shape {tuple(b.shape)}, the weight {tuple(derived[name].shape)}")
            used = {int(v) for v in b.unique()} - {0}
            bad = sorted(used - set(SUPPORTED_BITS))
            if bad:
                raise ValueError(f"quant['{name}'] holds bit-width {bad[0]}; the palette is {SUPPORTED_BITS}")
            bits[name] = b.to(torch.int8)
            out[name] = b != 0
    if masks is not None:
        for name, m in masks.items():
            if name not in derived:
                raise ValueError(f"masks names '{name}', which is not a Conv/Linear layer of the model")
            m = torch.as_tensor(m).to(device="cpu", dtype=torch.bool)
            if tuple(m.shape) != tuple(derived[name].shape):
                raise ValueError(f"masks['{name}'] has shape {tuple(m.shape)}, the weight {tuple(derived[name].shape)}")
            if bits is not None and name in bits and not torch.equal(m, bits[name] != 0):
                raise ValueError(f"masks['{name}'] and quant['{name}'] disagree on which weights are kept")
            out[name] = m
    for name, m in out.items():
        weight = layer_weight(pruned, name).detach().cpu()
        if bool((weight[~m] != 0).any()):
            raise ValueError(f"layer '{name}' has nonzero weights outside its mask")
    return out, bits


def _split(images: torch.Tensor | None, holdout: torch.Tensor | None,
           config: RepairConfig) -> tuple[torch.Tensor, torch.Tensor]:
    if images is None:
        fit, held = calibration_split(config.n_images, config.n_holdout if holdout is None else 0, seed=config.seed)
        return fit, (held if holdout is None else holdout)
    if not isinstance(images, torch.Tensor) or images.ndim < 2 or len(images) == 0:
        raise ValueError("images must be a non-empty tensor of calibration inputs (N × ...)")
    fit = images[:config.n_images]
    if holdout is None:
        holdout = images[config.n_images:config.n_images + config.n_holdout]
    return fit, holdout


def repair(dense: nn.Module, pruned: nn.Module, images: torch.Tensor | None = None,
           config: RepairConfig = RepairConfig(), *, holdout: torch.Tensor | None = None,
           masks: Mapping[str, torch.Tensor] | None = None, quant: Mapping[str, torch.Tensor] | None = None,
           on_progress: Callable[[int, int, str], None] | None = None,
           cancel: threading.Event | Callable[[], bool] | None = None) -> RepairResult:
    """Repair ``pruned`` against ``dense`` (same architecture) on calibration images; see :mod:`core.measure.repair`.

    * ``images``: calibration inputs, already normalised; the first ``config.n_images`` fit the
      repair and, unless ``holdout`` is given, the next ``config.n_holdout`` measure it. None:
      drawn from the CIFAR-10 *training* split (:func:`calibration_split`, ``config.seed``).
    * ``masks``: keep-masks by layer name (default: the pruned weights' nonzeros); ``quant``:
      per-weight bit-widths by layer name (0 = pruned; see :func:`bit_widths`), which also
      fix the masks.
    * ``on_progress(done, total, layer)`` after each layer; ``cancel`` checked before each.
    """
    if not isinstance(config, RepairConfig):
        raise TypeError(f"config must be a RepairConfig, got {type(config).__name__}")
    start = time.perf_counter()
    _check_models(dense, pruned)
    layer_masks, bits = _check_masks(pruned, masks, quant)
    fit, held = _split(images, holdout, config)
    device = next(pruned.parameters()).device
    fit = fit.to(device)
    with torch.no_grad():
        model = copy.deepcopy(pruned).eval()
    layers = prunable_layers(model)
    # the repair runs at modules: an attention projection (in_proj_weight) is multiplied inside
    # nn.MultiheadAttention's own forward, where no hook sees its output; it stays as pruned
    names = [layer.name for layer in layers if layer.param == "weight"]
    skipped = {layer.name: ATTENTION_SKIP for layer in layers if layer.param != "weight"}
    repairer = None
    if config.method == "bn":
        raise_if_cancelled(cancel, 0, 1)
        model = bn_recalibrate(model, fit, batch_size=config.batch_size)
        if on_progress is not None:
            on_progress(1, 1, "BatchNorm statistics")
    elif config.level >= METHODS.index("bias"):
        batches = [fast_layout(fit[i:i + config.batch_size]) for i in range(0, len(fit), config.batch_size)]
        repairer = repair_in_lockstep(dense, model, batches, names, config, layer_masks, bits, on_progress, cancel)
    model.eval()
    seconds = time.perf_counter() - start
    error_start = time.perf_counter()
    if len(held):
        errors = layer_errors(dense, {"before": pruned, "after": model}, held.to(device), names, config.batch_size)
    else:
        errors = {"before": {n: float("nan") for n in names}, "after": {n: float("nan") for n in names}}
    error_seconds = time.perf_counter() - error_start
    rows = []
    for layer in layers:
        mask = layer_masks[layer.name]
        if layer.name in skipped:
            action = skipped[layer.name]
        elif repairer is not None:
            action = repairer.actions.get(layer.name, "not called by the forward pass")
        else:
            action = {"none": "unchanged", "bn": "BatchNorm statistics re-estimated"}[config.method]
        rows.append({"name": layer.name, "kind": layer.kind, "kept": int(mask.sum()), "numel": mask.numel(),
                     "action": action, "err_before": errors["before"].get(layer.name, float("nan")),
                     "err_after": errors["after"].get(layer.name, float("nan")),
                     "seconds": repairer.seconds.get(layer.name, 0.0) if repairer is not None else 0.0})
    before, after = pruned.state_dict(), model.state_dict()
    changed = tuple(key for key in after if not torch.equal(before[key], after[key]))
    return RepairResult(model=model, method=config.method, seconds=seconds, changed=changed,
                        errors=pd.DataFrame(rows), n_images=len(fit), n_holdout=len(held), config=config,
                        quantized=dict(repairer.quantized) if repairer is not None else {},
                        error_seconds=error_seconds)


# ---------------------------------------------------------------- an engine's result, as the front ends repair it

def levels(method: str) -> tuple[str, ...]:
    """The methods up to and including ``method``, in order (``"bias"`` → none, bn, bias)."""
    if method not in METHODS:
        raise ValueError(f"repair method must be one of {', '.join(METHODS)}; got {method!r}")
    return METHODS[:METHODS.index(method) + 1]


def repair_setting(dense: nn.Module, engine, result, images: torch.Tensor | None = None,
                   config: RepairConfig = RepairConfig(), *,
                   on_progress: Callable[[int, int, str], None] | None = None,
                   cancel: threading.Event | Callable[[], bool] | None = None) -> RepairResult:
    """:func:`repair` of an engine result (``engine.apply(...)``) against ``dense``, the engine's model.

    The masks are the engine's; a quantized result is repaired with its bit-widths
    (:func:`bit_widths`), so :attr:`RepairResult.quantized` holds the codes and scales a packed
    file of the same size needs (``core.deploy.packed_writer.compressed_bytes(result, repaired=...)``).
    Neither ``dense`` nor the result is modified.
    """
    quant = bit_widths(engine, result) if result.config.quantized else None
    return repair(dense, result.model, images, config, quant=quant, on_progress=on_progress, cancel=cancel)


"""Repair of a channel-pruned model without retraining: least-squares re-solve of each layer, then BatchNorm.

A channel-pruned model (:class:`core.method.channels.ChannelResult`) is repaired against the
dense model it came from, on unlabelled CIFAR-10 *training* images, in one lock-step pass
(:class:`core.measure.calibration.Lockstep`: both models side by side, node by node). At every
Conv/Linear ℓ, in forward order, whose inputs differ from the dense model's (a removed input
channel, or any change upstream), with kept output channels K_ℓ (all when none were removed)::

    W_ℓ, b_ℓ = argmin ‖X_ℓ · [W; b] − Y_ℓ[:, K_ℓ]‖² + λ‖W‖²,    λ = ridge · mean(diag XᵀX / m)

X_ℓ: the *smaller, already-repaired* model's unfolded inputs (only the kept input channels);
Y_ℓ: the *dense* model's outputs of that layer, restricted to the kept output channels (He et
al. 2017, ThiNet). The Gram matrices and the ridge solves are :mod:`core.measure.repair.solver`'s
(``conv_rows``, ``add_gram``, ``solve``: float64, Cholesky). Then, at every BatchNorm, the
running mean and variance are re-estimated on the activations the repaired model really feeds
it, and the mean of each kept channel restored to the dense model's (β shift), as
:mod:`core.measure.repair` does for weight-level pruning.

Methods (:class:`core.measure.repair.RepairConfig`): ``"none"`` (a copy), ``"bn"`` (BatchNorm
statistics only, :func:`core.measure.accuracy.bn_recalibrate`), ``"bias"`` (statistics and
means in the lock-step pass, no solve), ``"reconstruct"`` (all of the above).

Guarantees, as the weight-level repair's: no gradient step, no labels, no test images (the
default images are :func:`core.measure.calibration.calibration_split`'s training images); the
dense model and the pruned model are never modified; ``cancel`` (an Event or a callable) is
checked before every layer and every calibration batch of a layer (:class:`RepairCancelled`,
nothing returned); ``on_progress(done, total, layer)`` after each layer;
:func:`estimate_channel_repair_seconds` is the time estimate before starting.
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
from core.measure.calibration import Lockstep, Step, TraceError, calibration_split
from core.measure.repair.estimate import estimate_seconds
from core.measure.repair.solver import add_gram, conv_rows, solve
from core.measure.repair.steps import channel_mean, channel_stats, submodule_or_none
from core.measure.repair.types import (
    METHODS,
    RepairConfig,
    RepairResult,
    raise_if_cancelled,
)
from core.method.channels import ChannelResult

_BN = nn.modules.batchnorm._BatchNorm
_LAYERS = (nn.Conv2d, nn.Linear)
RECONSTRUCT = RepairConfig()  # the default: reconstruct on 512 training images


def _pick(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return t if keep is None else t.index_select(1, keep.to(t.device))


class _ChannelHooks:
    """The lock-step hooks: re-solve each changed Conv/Linear, re-estimate and re-centre each BatchNorm."""

    def __init__(self, config: RepairConfig, kept_out: Mapping[str, torch.Tensor], cut: set[str],
                 order: list[str], on_progress, cancel, root: nn.Module):
        self.config, self.kept_out, self.cut, self.order, self.root = config, kept_out, cut, order, root
        self.on_progress, self.cancel = on_progress, cancel
        self.done = 0
        self.actions: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.pending_bn: dict[str, str] = {}

    def check_cancel(self) -> None:
        raise_if_cancelled(self.cancel, self.done, len(self.order))

    def _why_not(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)
                                              or module.padding_mode != "zeros"):
            return "not re-solved (grouped convolution or non-zero padding)"
        return None

    def layer(self, step: Step) -> list[torch.Tensor]:
        start = time.perf_counter()
        keep = self.kept_out.get(step.name)
        targets = [_pick(y, keep) for y in step.dense_outputs]
        same = step.name not in self.cut and all(torch.equal(a, b) for a, b in zip(step.inputs, step.dense_inputs))
        actions = []
        if same:
            actions.append("unchanged (same inputs, all channels)")
        elif self.config.level >= METHODS.index("reconstruct"):
            reason = self._why_not(step.module)
            if reason is None:
                self._reconstruct(step, targets)
                actions.append("re-solved (least squares on the kept inputs)")
            else:
                actions.append(reason)
        outputs = step.forward()
        feeds_bn = len(step.users) == 1 and isinstance(submodule_or_none(self.root, step.users[0]), _BN)
        if not same and feeds_bn:
            self.pending_bn[step.users[0]] = step.name
            actions.append(f"mean restored at {step.users[0]} (BN shift)")
        elif not same and getattr(step.module, "bias", None) is not None:
            step.module.bias.add_((channel_mean(targets) - channel_mean(outputs)).to(step.module.bias.dtype))
            outputs = step.forward()
            actions.append("mean restored (bias)")
        self.actions[step.name] = "; ".join(actions)
        self.seconds[step.name] = time.perf_counter() - start
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(self.done, len(self.order), step.name)
        return outputs

    def batchnorm(self, step: Step) -> list[torch.Tensor]:
        bn = step.module
        keep = self.kept_out.get(step.name)
        if step.name not in self.cut and all(torch.equal(a, b) for a, b in zip(step.inputs, step.dense_inputs)):
            return step.forward()  # upstream of every change: left exactly as trained
        if bn.track_running_stats and bn.running_mean is not None:
            mean, m2, count = channel_stats(step.inputs)  # the running statistics BatchNorm keeps
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
            bn.running_var.copy_((m2 / max(count - 1, 1)).to(bn.running_var.dtype))
        outputs = step.forward()
        if step.name in self.pending_bn:
            delta = channel_mean([_pick(y, keep) for y in step.dense_outputs]) - channel_mean(outputs)
            if bn.affine:
                bn.bias.add_(delta.to(bn.bias.dtype))
            else:
                bn.running_mean.sub_((delta * torch.sqrt(bn.running_var.double() + bn.eps)).to(bn.running_mean.dtype))
            outputs = step.forward()
        return outputs

    def _reconstruct(self, step: Step, targets: list[torch.Tensor]) -> None:
        module = step.module
        weight = module.weight
        n_out, n_in = weight.shape[0], weight[0].numel()
        has_bias = module.bias is not None
        width = n_in + int(has_bias)  # every row keeps every column: one shared factorisation (solver's fast path)
        gram = torch.zeros(width, width, dtype=torch.float64)
        cross = torch.zeros(width, n_out, dtype=torch.float64)
        rows = 0
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.order.index(step.name))
        for x, y in zip(step.inputs, targets):
            self.check_cancel()
            if isinstance(module, nn.Conv2d):
                xs, ys = conv_rows(module, x, y, self.config.positions, generator)
            else:
                xs, ys = x.reshape(-1, n_in), y.reshape(-1, n_out)
            xs, ys = xs.float().cpu(), ys.float().cpu()
            if has_bias:
                xs = torch.cat([xs, xs.new_ones(len(xs), 1)], 1)
            add_gram(gram, xs)
            cross += (xs.T @ ys).double()
            rows += len(xs)
        gram = torch.triu(gram) + torch.triu(gram, 1).T
        gram /= rows
        cross /= rows
        lam = torch.full((width,), self.config.ridge * float(gram.diagonal()[:n_in].mean()), dtype=torch.float64)
        if has_bias:
            lam[-1] = 0.0
        support = torch.ones(n_out, width, dtype=torch.bool)
        solved, _ = solve(gram, cross, support, lam, None, check=self.check_cancel)
        weight.copy_(solved[:, :n_in].to(weight.dtype).view_as(weight))
        if has_bias:
            module.bias.copy_(solved[:, -1].to(module.bias.dtype))


@torch.no_grad()
def channel_layer_errors(dense: nn.Module, models: Mapping[str, nn.Module], images: torch.Tensor, names: list[str],
                         kept_out: Mapping[str, torch.Tensor], batch_size: int = 128) -> dict[str, dict[str, float]]:
    """``{key: {layer: ‖y − y_dense[:, K]‖² / ‖y_dense[:, K]‖²}}``: each layer's output error on its kept channels."""
    sums = {key: dict.fromkeys(names, 0.0) for key in models}
    norms = dict.fromkeys(names, 0.0)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        reference: dict[str, torch.Tensor] = {}
        hooks = [dense.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n, ref=reference: ref.__setitem__(n, _pick(out, kept_out.get(n)))) for n in names]
        try:
            dense.eval()(x)
        finally:
            for h in hooks:
                h.remove()
        for n in names:
            norms[n] += float(reference[n].double().pow(2).sum()) if n in reference else 0.0
        for key, model in models.items():
            hooks = [model.get_submodule(n).register_forward_hook(
                lambda m, a, out, n=n, key=key, ref=reference: sums[key].__setitem__(
                    n, sums[key][n] + float((out - ref[n]).double().pow(2).sum()))) for n in names]
            try:
                model.eval()(x)
            finally:
                for h in hooks:
                    h.remove()
    return {key: {n: sums[key][n] / norms[n] if norms[n] > 0 else float("nan") for n in names} for key in models}


def repair_channels(dense: nn.Module, result: ChannelResult, images: torch.Tensor | None = None,
                    config: RepairConfig = RECONSTRUCT, *, holdout: torch.Tensor | None = None,
                    on_progress: Callable[[int, int, str], None] | None = None,
                    cancel: threading.Event | Callable[[], bool] | None = None) -> RepairResult:
    """Repair ``result.model`` (channel-pruned from ``dense``) on calibration images; see the module docstring.

    ``images``: normalised calibration inputs (first ``config.n_images`` fit, the next
    ``config.n_holdout`` measure unless ``holdout`` is given); None: CIFAR-10 *training* images.
    Returns a :class:`RepairResult` whose ``model`` is a new, smaller module; ``errors`` has one
    row per Conv/Linear: ``name``, ``kept_out``, ``action``, ``err_before``, ``err_after``, ``seconds``.
    """
    if not isinstance(config, RepairConfig):
        raise TypeError(f"config must be a RepairConfig, got {type(config).__name__}")
    if not isinstance(result, ChannelResult):
        raise TypeError(f"result must be a ChannelResult (ChannelPruner.apply), got {type(result).__name__}")
    start = time.perf_counter()
    if images is None:
        fit, held = calibration_split(config.n_images, config.n_holdout if holdout is None else 0, seed=config.seed)
        held = held if holdout is None else holdout
    else:
        fit = images[:config.n_images]
        held = images[config.n_images:config.n_images + config.n_holdout] if holdout is None else holdout
    with torch.no_grad():
        model = copy.deepcopy(result.model).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    hooks = None
    if config.method == "bn":
        raise_if_cancelled(cancel, 0, 1)
        model = bn_recalibrate(model, fit, batch_size=config.batch_size)
        if on_progress is not None:
            on_progress(1, 1, "BatchNorm statistics")
    elif config.level >= METHODS.index("bias"):
        batches = [fit[i:i + config.batch_size] for i in range(0, len(fit), config.batch_size)]
        runner = Lockstep(dense, model, batches)
        shared = [n for n in names if runner.calls.get(n, 0) > 1]
        if shared:
            raise TraceError(f"layer '{shared[0]}' is called more than once in the forward pass; "
                             "a shared layer cannot be fitted to each call")
        order = [n for n in runner.module_order() if n in names]
        hooks = _ChannelHooks(config, result.kept_out, set(result.kept_in) | set(result.kept_out), order,
                              on_progress, cancel, model)
        table = {n: hooks.layer for n in order}
        table.update({n: hooks.batchnorm for n, m in model.named_modules() if isinstance(m, _BN) and n in runner.calls})
        runner.run(table, between=hooks.check_cancel)
    model.eval()
    seconds = time.perf_counter() - start
    error_start = time.perf_counter()
    nan = {n: float("nan") for n in names}
    errors = (channel_layer_errors(dense, {"before": result.model, "after": model}, held, names, result.kept_out,
                                   config.batch_size) if len(held) else {"before": nan, "after": nan})
    rows = [{"name": n, "kept_out": int(model.get_submodule(n).weight.shape[0]),
             "action": hooks.actions.get(n, "not called") if hooks else {"none": "unchanged", "bn": "BatchNorm statistics re-estimated"}[config.method],
             "err_before": errors["before"][n], "err_after": errors["after"][n],
             "seconds": hooks.seconds.get(n, 0.0) if hooks else 0.0} for n in names]
    before, after = result.model.state_dict(), model.state_dict()
    changed = tuple(k for k in after if not torch.equal(before[k], after[k]))
    return RepairResult(model=model, method=config.method, seconds=seconds, changed=changed, errors=pd.DataFrame(rows),
                        n_images=len(fit), n_holdout=len(held), config=config,
                        error_seconds=time.perf_counter() - error_start)


def estimate_channel_repair_seconds(result: ChannelResult, config: RepairConfig = RECONSTRUCT, *,
                                    input_shape: tuple[int, ...] | None = None) -> float:
    """An *estimate* of :func:`repair_channels`'s seconds, before it starts: the weight-level repair's
    estimate (:func:`core.measure.repair.estimate_seconds`) for the smaller model with every weight kept
    (the re-solves are dense), which counts its forward passes, Gram matrices and solves."""
    return estimate_seconds(result.model, config, input_shape=input_shape)

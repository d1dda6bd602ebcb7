"""The per-layer repair steps (BatchNorm re-estimation, bias correction, reconstruction) and the lock-step walk over layers."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from core.measure.calibration import Lockstep, Step, TraceError
from core.measure.repair.solver import add_gram, conv_rows, decode, solve
from core.measure.repair.types import METHODS, QuantizedLayer, RepairConfig, raise_if_cancelled

_BN = nn.modules.batchnorm._BatchNorm


def _why_not(module: nn.Module) -> str | None:
    """Why a layer cannot be reconstructed (None: it can)."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not reconstructed (Conv2d and Linear are)"
    if module.groups != 1:
        return "grouped convolution is not reconstructed"
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        return "only numeric zero padding is reconstructed"
    return None


# ---------------------------------------------------------------- the lock-step repair

def channel_stats(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per channel (dim 1) mean and summed squared deviation over every other dimension and batch.

    Each batch is reduced in its own dtype (pairwise sums), the batches are combined in float64
    (Chan et al.'s parallel formula), so no float64 copy of the activations is made.
    """
    means, squares, counts = [], [], []
    for t in batches:
        dims = [d for d in range(t.ndim) if d != 1]
        var, mean = torch.var_mean(t, dims, correction=0) if dims else (torch.zeros_like(t), t)
        n = t.numel() // t.shape[1]
        means.append(mean.double())
        squares.append(var.double() * n)
        counts.append(n)
    total = sum(counts)
    mean = sum(m * n for m, n in zip(means, counts)) / total
    m2 = sum(q + n * (m - mean) ** 2 for q, m, n in zip(squares, means, counts))
    return mean, m2, total


def channel_mean(batches: list[torch.Tensor]) -> torch.Tensor:
    """Mean over every dimension but 1 (channels), over all batches, in float64."""
    means, total = 0, 0
    for t in batches:
        dims = [d for d in range(t.ndim) if d != 1]
        n = t.numel() // t.shape[1]
        means = means + (t.mean(dims) if dims else t).double() * n
        total += n
    return means / total


def submodule_or_none(root: nn.Module, name: str) -> nn.Module | None:
    """``root.get_submodule(name)``, or None where ``name`` is not a module (a functional op of the trace)."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


class LockstepRepair:
    """The hooks the lock-step runner calls at every pruned layer and every BatchNorm, and what they did.

    ``actions`` / ``seconds``: per repaired layer, what was done and its own time;
    ``quantized``: per reconstructed layer with bit-widths, its codes and scales.
    """

    def __init__(self, config: RepairConfig, masks: dict[str, torch.Tensor], bits: dict[str, torch.Tensor] | None,
                 order: list[str], on_progress, cancel, root: nn.Module):
        self.root = root
        self.config, self.masks, self.bits = config, masks, bits or {}
        self.order = [name for name in order if name in masks]
        self.on_progress, self.cancel = on_progress, cancel
        self.done = 0
        self.actions: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.quantized: dict[str, QuantizedLayer] = {}
        self.pending_bn: dict[str, str] = {}  # BN name → the pruned layer whose mean it restores

    def check_cancel(self) -> None:
        raise_if_cancelled(self.cancel, self.done, len(self.order))

    def layer(self, step: Step) -> list[torch.Tensor]:
        start = time.perf_counter()
        module = step.module
        actions = []
        if self.config.level >= METHODS.index("reconstruct"):
            reason = _why_not(module)
            if reason is None:
                self._reconstruct(step)
                actions.append("reconstructed" + (" + quantized (GPTQ)" if step.name in self.bits else ""))
            else:
                actions.append(reason)
        feeds_bn = len(step.users) == 1 and isinstance(submodule_or_none(self.root, step.users[0]), _BN)
        outputs = step.forward()
        if feeds_bn:
            self.pending_bn[step.users[0]] = step.name
            actions.append(f"mean restored at {step.users[0]} (BN shift)")
        elif getattr(module, "bias", None) is not None:
            delta = channel_mean(step.dense_outputs) - channel_mean(outputs)
            module.bias.add_(delta.to(module.bias.dtype))
            outputs = step.forward()
            actions.append("mean restored (bias)")
        else:
            actions.append("no bias to restore the mean")
        self.actions[step.name] = "; ".join(actions)
        self.seconds[step.name] = time.perf_counter() - start
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(self.done, len(self.order), step.name)
        return outputs

    def batchnorm(self, step: Step) -> list[torch.Tensor]:
        bn = step.module
        if bn.track_running_stats and bn.running_mean is not None:
            mean, m2, count = channel_stats(step.inputs)
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
            bn.running_var.copy_((m2 / max(count - 1, 1)).to(bn.running_var.dtype))
        outputs = step.forward()
        if step.name in self.pending_bn:
            delta = channel_mean(step.dense_outputs) - channel_mean(outputs)
            if bn.affine:
                bn.bias.add_(delta.to(bn.bias.dtype))
            else:  # no shift: move the mean the BN subtracts (γ = 1, so exact up to σ)
                bn.running_mean.sub_((delta * torch.sqrt(bn.running_var.double() + bn.eps)).to(bn.running_mean.dtype))
            outputs = step.forward()
        return outputs

    def _reconstruct(self, step: Step) -> None:
        module = step.module
        weight = module.weight
        n_out = weight.shape[0]
        n_in = weight[0].numel()
        has_bias = module.bias is not None
        width = n_in + int(has_bias)
        gram = torch.zeros(width, width, dtype=torch.float64)
        cross = torch.zeros(width, n_out, dtype=torch.float64)
        rows = 0
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.order.index(step.name))
        for x, y in zip(step.inputs, step.dense_outputs):
            self.check_cancel()  # a large layer takes seconds: a cancel need not wait for its end
            if isinstance(module, nn.Conv2d):
                xs, ys = conv_rows(module, x, y, self.config.positions, generator)
            else:
                xs, ys = x.reshape(-1, n_in), y.reshape(-1, n_out)
            xs, ys = xs.float().cpu(), ys.float().cpu()  # the solves run on the CPU, in float64
            if has_bias:
                xs = torch.cat([xs, xs.new_ones(len(xs), 1)], 1)
            add_gram(gram, xs)
            cross += (xs.T @ ys).double()
            rows += len(xs)
        gram = torch.triu(gram) + torch.triu(gram, 1).T  # only the upper blocks were accumulated
        gram /= rows
        cross /= rows
        lam = torch.full((width,), self.config.ridge * float(gram.diagonal()[:n_in].mean()), dtype=torch.float64)
        if has_bias:
            lam[-1] = 0.0
        support = self.masks[step.name].reshape(n_out, n_in)
        if has_bias:
            support = torch.cat([support, support.new_ones(n_out, 1)], 1)
        bits = self.bits.get(step.name)
        bits_2d = None if bits is None else bits.reshape(n_out, n_in)
        start = weight.detach().reshape(n_out, n_in).double().cpu()
        if has_bias:
            start = torch.cat([start, module.bias.detach().double().cpu().unsqueeze(1)], 1)
        solved, scales = solve(gram, cross, support, lam, bits_2d, check=self.check_cancel, start=start)
        new_weight = solved[:, :n_in]
        if bits_2d is not None:
            new_weight, record = decode(new_weight, bits_2d, scales, weight.dtype)
            self.quantized[step.name] = QuantizedLayer(bits.clone(), record.codes.view(weight.shape), record.scales)
        else:
            new_weight = new_weight.to(weight.dtype)
        new_weight = torch.where(support[:, :n_in], new_weight, torch.zeros((), dtype=weight.dtype))
        weight.copy_(new_weight.view_as(weight))
        if has_bias:
            module.bias.copy_(solved[:, -1].to(module.bias.dtype))


def repair_in_lockstep(dense: nn.Module, model: nn.Module, batches: list[torch.Tensor], names: list[str],
                       config: RepairConfig, masks: dict[str, torch.Tensor], bits: dict[str, torch.Tensor] | None,
                       on_progress: Callable[[int, int, str], None] | None,
                       cancel: threading.Event | Callable[[], bool] | None) -> LockstepRepair:
    """Repair ``model`` in place, layer by layer in forward order, against ``dense`` on ``batches``.

    ``names``: the pruned layers (modules) to repair; ``masks`` / ``bits``: their keep-masks and
    bit-widths. Every layer of ``names`` the forward pass calls gets :meth:`LockstepRepair.layer`,
    every BatchNorm :meth:`LockstepRepair.batchnorm`; ``cancel`` is checked before each layer and
    between batches (:class:`RepairCancelled`). A layer called more than once raises
    :class:`TraceError`. Returns the repairer, whose ``actions``, ``seconds`` and ``quantized``
    say what was done.
    """
    runner = Lockstep(dense, model, batches)
    shared = [name for name in names if runner.calls.get(name, 0) > 1]
    if shared:
        raise TraceError(f"layer '{shared[0]}' is called more than once in the forward pass; "
                         "a shared layer cannot be fitted to each call")
    repairer = LockstepRepair(config, masks, bits, runner.module_order(), on_progress, cancel, model)
    hooks = {name: repairer.layer for name in names if name in runner.calls}
    hooks.update({name: repairer.batchnorm for name, m in model.named_modules()
                  if isinstance(m, _BN) and name in runner.calls})
    runner.run(hooks, between=repairer.check_cancel)
    return repairer

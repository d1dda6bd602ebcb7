"""Channel pruning's mechanics: tracing helpers, the per-module slicing, the boundary pruner for Torch-Pruning.

* :func:`default_input`, :func:`channel_boundaries`, :func:`layer_shapes`: what one forward pass of the dense model tells;
* :func:`slice_fast` / :func:`own_tensors`: cutting a module's tensors (new tensors, never the dense ones);
* :class:`Boundary`: a Torch-Pruning pruner that stops the dependency graph at a parameter-free module
  that changes the channel count (its channel offsets cannot be sliced).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from core.method.channel_config import ChannelError

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Item:
    """One (module, dimension) of a group: its handler and, per index of that dimension, the root channel."""

    name: str
    kind: str  # "out" or "in"
    handler: object
    pruning_dim: int
    idx: torch.Tensor  # int64, indices in the module's dimension
    root: torch.Tensor  # int64, the group channel each index belongs to
    size: int  # the dimension's full size


def default_input(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, LAYERS)), None)
    if isinstance(first, nn.Conv2d):
        return torch.randn(1, first.in_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    if isinstance(first, nn.Linear):
        return torch.randn(1, first.in_features, generator=torch.Generator().manual_seed(0))
    raise ChannelError(f"{type(model).__name__}: pass example_input (the first layer is "
                       f"{type(first).__name__ if first is not None else 'missing'})")


def channel_boundaries(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, str]:
    """Parameter-free leaf modules that change the channel count (dim 1) between input and output."""
    found: dict[nn.Module, str] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, out):
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor) \
                and args[0].ndim >= 2 and out.ndim >= 2 and args[0].shape[1] != out.shape[1]:
            found[module] = names[module]

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if not list(m.children()) and not list(m.parameters(recurse=False)) and not isinstance(m, nn.Flatten)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return found


def layer_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Per Conv/Linear: (output positions per sample, kernel elements per input channel)."""
    shapes: dict[str, tuple[int, int]] = {}
    batch = example.shape[0]

    def hook(name, module, out):
        per_out = out.numel() // batch // (out.shape[1] if isinstance(module, nn.modules.conv._ConvNd) else out.shape[-1])
        kernel = math.prod(module.kernel_size) if isinstance(module, nn.modules.conv._ConvNd) else 1
        shapes[name] = (per_out, kernel)

    hooks = [m.register_forward_hook(lambda mod, a, o, name=n: hook(name, mod, o))
             for n, m in model.named_modules() if isinstance(m, LAYERS)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def structure_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are still the original tensors (the caller
    replaces them): every module a new object with its own ``_parameters``/``_buffers``/``_modules``
    dicts. Several times faster than ``copy.deepcopy`` (no pickling protocol per object)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {name: None if child is None else structure_copy(child) for name, child in module._modules.items()}
    return new


def own_tensors(module: nn.Module, recurse: bool = True, only: Mapping[int, torch.Tensor] | None = None) -> None:
    """Replace ``module``'s parameters and buffers (those in ``only``, by id, when given) with clones."""
    for owner in (module.modules() if recurse else (module,)):
        for pname, param in list(owner.named_parameters(recurse=False)):
            if only is None or id(param) in only:
                setattr(owner, pname, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
        for bname, buf in list(owner.named_buffers(recurse=False)):
            if buf is not None and (only is None or id(buf) in only):
                owner._buffers[bname] = buf.clone()


def _take(t: torch.Tensor, keep_out: torch.Tensor | None, keep_in: torch.Tensor | None) -> torch.Tensor:
    if keep_out is not None:
        t = t.index_select(0, keep_out)
    if keep_in is not None and t.ndim > 1:
        t = t.index_select(1, keep_in)
    return t if (keep_out is not None or keep_in is not None) else t.clone()


def slice_fast(module: nn.Module, keep_out: torch.Tensor | None, keep_in: torch.Tensor | None) -> bool:
    """Slice a plain Conv (groups 1 or depthwise), Linear or BatchNorm directly; False for anything else."""
    def param(t, ko, ki):
        return nn.Parameter(_take(t.detach(), ko, ki), requires_grad=t.requires_grad)

    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if module.groups != 1 and not depthwise:
            return False
        if depthwise:
            keep = keep_out if keep_out is not None else keep_in
            module.weight = param(module.weight, keep, None)
            if module.bias is not None:
                module.bias = param(module.bias, keep, None)
            module.in_channels = module.out_channels = module.groups = len(keep)
            return True
        module.weight = param(module.weight, keep_out, keep_in)
        if module.bias is not None:
            module.bias = param(module.bias, keep_out, None)
        module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1]
        return True
    if type(module) is nn.Linear:
        module.weight = param(module.weight, keep_out, keep_in)
        if module.bias is not None:
            module.bias = param(module.bias, keep_out, None)
        module.out_features, module.in_features = module.weight.shape
        return True
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and keep_in is None:
        keep = keep_out
        if module.affine:
            module.weight, module.bias = param(module.weight, keep, None), param(module.bias, keep, None)
        if module.running_mean is not None:
            module.running_mean = module.running_mean.index_select(0, keep)
            module.running_var = module.running_var.index_select(0, keep)
        if module.num_batches_tracked is not None:
            module.num_batches_tracked = module.num_batches_tracked.clone()
        module.num_features = len(keep)
        return True
    return False


class Boundary:
    """A Torch-Pruning pruner for a parameter-free module that changes the channel count: its input
    and output channels are separate (so the graph stops there) and it is never sliced."""

    def __init__(self):
        self.pruning_dim = 1

    def prune_out_channels(self, layer, idxs):
        raise ChannelError("a channel-count-changing module cannot be sliced")

    def prune_in_channels(self, layer, idxs):
        raise ChannelError("a channel-count-changing module cannot be sliced")

    def get_out_channels(self, layer):
        return None

    def get_in_channels(self, layer):
        return None

    def get_in_channel_groups(self, layer):
        return 1

    def get_out_channel_groups(self, layer):
        return 1


def failing_module(err: BaseException, names: Mapping[nn.Module, str]) -> str:
    text = str(err)
    hits = [name for name in names.values() if name and f"'{name}'" in text]
    return f"'{hits[0]}'" if hits else ""

"""Boundary pruning: β_ℓ = τ · max|W_ℓ|, keep W where |W| ≥ β_ℓ, zero the rest.

Which weights are prunable (:func:`prunable_layers`): the parameters of two or more dimensions that
are the *weight operand* of a convolution, a linear layer or a matrix product, found without
running the model:

* the ``weight`` of every Conv1d/2d/3d and Linear module (optionally only the layers named in
  ``layers``);
* the projections ``nn.MultiheadAttention`` multiplies by itself (``F.multi_head_attention_forward``,
  not through a Linear module): the packed Q/K/V ``in_proj_weight``, or ``q_proj_weight``,
  ``k_proj_weight`` and ``v_proj_weight`` when the key and value sizes differ (its ``out_proj``
  is a Linear module, found as such);
* in a ``torch.fx.GraphModule`` (what ``torch.export``'s ``ExportedProgram.module()`` and
  ``torch.fx.symbolic_trace`` give), every parameter its graph passes as the weight of a
  conv/linear call or as an operand of a matmul-family call (through transposes and views);
* ``include_norm=True`` reproduces the paper's pseudocode (``hasattr(layer, 'weight')``):
  BatchNorm/LayerNorm/GroupNorm scales are pruned too. Zeroing a BatchNorm scale switches
  its channel off, which is why this option collapses a trained CNN's accuracy; it is only
  available as an explicit, labelled choice.

Why by module type and graph, not by recording a forward pass (a ``TorchFunctionMode`` on an
example input): the layer list must not depend on whether, or with which input, an engine was
built (settings name layers in ``layer_tau``, packed files and the app's tables); a forward needs
an input shape the engine is not always given; and it would run the model at load time. Checked
against such a recording (every parameter whose storage reaches ``aten.convolution``, ``mm``,
``addmm``, ``bmm`` or ``_native_multi_head_attention``, ``tests/method/test_weight_discovery.py``):
the two agree on all 63 torchvision classifiers of at most 100 M parameters. A custom module that
calls ``F.linear(x, self.my_weight)`` in Python is not found (trace it with ``torch.fx`` or
``torch.export`` first).

Names: a layer is named after its module (``layer1.0.conv1``) when the parameter is that module's
``weight``, as before; any other parameter by its full dotted name
(``encoder.layers.encoder_layer_0.self_attention.in_proj_weight``). :attr:`PrunableLayer.parameter_name`
is the state_dict key either way, and :func:`layer_weight` finds a layer's tensor in a model by name.

The formulas here are the single source of truth; the engine's incremental algorithm is
tested against :func:`boundary_mask`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.nn.utils import prune

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)


#: The projections ``nn.MultiheadAttention`` multiplies by in its own forward (packed, or separate
#: when the key/value sizes differ); ``out_proj`` is a Linear module.
ATTENTION_WEIGHTS: tuple[str, ...] = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable weight: its layer name, its module's type name, the module and the parameter's attribute.

    ``param`` is ``"weight"`` for Conv/Linear (and norm) layers, whose ``name`` is the module's
    dotted path; for another parameter (``in_proj_weight``) ``name`` is the parameter's own
    dotted path (see :func:`layer_name`).
    """

    name: str
    kind: str
    module: nn.Module
    param: str = "weight"

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def module_path(self) -> str:
        """The dotted path of the module holding the weight."""
        if self.param == "weight":
            return self.name
        return self.name[:-len(self.param)].removesuffix(".")

    @property
    def parameter_name(self) -> str:
        """The weight's dotted parameter name: its key in ``model.state_dict()`` and ``named_parameters()``."""
        return parameter_name(self.name, self.param)


def layer_name(module_path: str, param: str) -> str:
    """The layer name of ``<module_path>.<param>``: the module's path for its ``weight``, else the parameter's."""
    if param == "weight":
        return module_path
    return f"{module_path}.{param}" if module_path else param


def parameter_name(name: str, param: str = "weight") -> str:
    """The state_dict key of layer ``name`` whose parameter attribute is ``param`` (inverse of :func:`layer_name`)."""
    if param == "weight":
        return f"{name}.weight" if name else "weight"
    return name


def resolve_layer(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding layer ``name``'s weight and the weight's attribute name, for any model.

    ``name`` is a module path (its ``weight``) or a parameter's dotted path (see :func:`layer_name`);
    within one model the two cannot collide (an attribute is a submodule or a tensor, not both).
    ``ValueError`` when neither names a tensor of ``model``.
    """
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
        return module, "weight"
    parent, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(parent)
    except AttributeError:
        owner = None
    if owner is not None and attr and isinstance(getattr(owner, attr, None), torch.Tensor):
        return owner, attr
    raise ValueError(f"'{name}' names no weight of this model (neither a module with a weight nor a parameter)")


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """Layer ``name``'s weight tensor in ``model`` (a Conv/Linear module's ``weight`` or a parameter such as
    ``in_proj_weight``): the one accessor for code that holds a layer name and a model."""
    module, param = resolve_layer(model, name)
    return getattr(module, param)


def is_norm_layer(module: nn.Module) -> bool:
    """A normalisation layer (its ``weight`` is a per-channel scale, not a connection)."""
    return isinstance(module, NORM_LAYERS)


def check_tau(tau: float, where: str = "tau") -> float:
    """τ as a float: any real number in [0, 1] (Python, numpy scalar or one-element tensor), not a bool."""
    if isinstance(tau, torch.Tensor) and tau.numel() == 1 and not tau.dtype.is_complex and tau.dtype != torch.bool:
        tau = tau.item()
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"{where} must be a number in [0, 1], got {type(tau).__name__}")
    tau = float(tau)
    if math.isnan(tau) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"{where} must be in [0, 1], got {tau}")
    return tau


def check_finite(tensor: torch.Tensor, where: str, what: str = "weights") -> None:
    """Refuse a tensor holding NaN or Inf: ``ValueError("<where> has NaN or Inf <what> (k of n)")``.

    The one check shared by :class:`BoundaryPruning` and the engine: β = τ · max|W| has no
    meaning once max|W| is NaN or Inf, so neither path prunes such a tensor silently.
    """
    bad = int((~torch.isfinite(tensor.detach())).sum())
    if bad:
        raise ValueError(f"{where} has NaN or Inf {what} ({bad} of {tensor.numel()})")


def prunable_layers(
    model: nn.Module, include_norm: bool = False, layers: Iterable[str] | None = None
) -> list[PrunableLayer]:
    """The model's prunable weights in module order (see the module docstring for which ones).

    ``include_norm`` adds normalisation layers with an affine ``weight`` (the paper's
    ``hasattr(layer, 'weight')``). ``layers`` restricts to those layer names; a name that is
    not a prunable layer raises ``ValueError``. A model without attention or graph modules
    gives exactly the Conv/Linear list of the earlier, module-type-only discovery.
    """
    kinds = WEIGHT_LAYERS + (NORM_LAYERS if include_norm else ())
    found: list[PrunableLayer] = []
    for path, module in model.named_modules():
        if isinstance(module, kinds) and isinstance(getattr(module, "weight", None), torch.Tensor):
            found.append(PrunableLayer(path, type(module).__name__, module))
        elif isinstance(module, nn.MultiheadAttention):
            found.extend(PrunableLayer(layer_name(path, param), type(module).__name__, module, param)
                         for param in ATTENTION_WEIGHTS if _is_matrix(getattr(module, param, None)))
    graphs = [(path, module) for path, module in model.named_modules() if isinstance(module, torch.fx.GraphModule)]
    if graphs:  # after the modules: a weight a graph passes to F.conv2d that is also a Conv2d's is listed once
        seen = {id(layer.weight) for layer in found}
        for path, module in graphs:
            found.extend(_graph_weights(module, path, seen))
    if layers is not None:
        wanted = list(layers)
        by_name = {layer.name: layer for layer in found}
        missing = [name for name in wanted if name not in by_name]
        if missing:
            raise ValueError(f"layer '{missing[0]}' is not a prunable layer of this model")
        found = [layer for layer in found if layer.name in set(wanted)]
    if not found:
        raise ValueError(
            "the model has no prunable layer (Conv1d/2d/3d, Linear or attention projection weights"
            + (", or normalisation scales" if include_norm else "") + ")"
        )
    return found


def _is_matrix(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2


# ---------------------------------------------------------------- graph modules (torch.export, torch.fx)

#: Graph call targets whose weight operand is prunable, with the positions (and keyword) of that operand.
#: conv/linear: the weight; matmul family: either matrix operand that is a parameter.
_GRAPH_WEIGHT_OPERANDS: dict[str, tuple[tuple[int, ...], str | None]] = {
    **{op: ((1,), "weight") for op in (
        "aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten._convolution",
        "aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d", "aten.linear",
        "torch.conv1d", "torch.conv2d", "torch.conv3d", "torch.conv_transpose1d", "torch.conv_transpose2d",
        "torch.conv_transpose3d", "torch._C._nn.linear", "torch.nn.functional.linear")},
    **{op: ((0, 1), None) for op in (
        "aten.matmul", "aten.mm", "aten.bmm", "torch.matmul", "torch.mm", "torch.bmm", "_operator.matmul",
        "operator.matmul", "matmul", "mm", "bmm")},
    **{op: ((1, 2), None) for op in ("aten.addmm", "aten.baddbmm", "torch.addmm", "torch.baddbmm", "addmm",
                                     "baddbmm")},
}
#: Ops a weight may pass through on its way to the product (``linear`` as ``mm(x, t(W))``, ``x @ W.T``).
_GRAPH_VIEWS = frozenset({"aten.t", "aten.transpose", "aten.permute", "aten.view", "aten.reshape",
                          "aten._unsafe_view", "aten.contiguous", "aten.alias", "aten.detach", "torch.t",
                          "torch.transpose", "torch.permute", "torch.reshape", "t", "transpose", "permute", "view",
                          "reshape", "contiguous", "detach"})
#: ``W.T`` in a ``torch.fx.symbolic_trace`` graph is ``getattr(W, "T")``.
_GRAPH_TRANSPOSE_ATTRS = frozenset({"T", "mT", "data"})


def _target_name(node: torch.fx.Node) -> str:
    """``aten.linear`` for ``torch.ops.aten.linear.default``, ``torch.matmul``, or a method's name."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', '')}".removeprefix(".")


def _graph_weights(graph_module: torch.fx.GraphModule, prefix: str, seen: set[int]) -> list[PrunableLayer]:
    """The parameters (≥ 2 dims) ``graph_module``'s graph passes as a weight operand, in graph order.

    Read from the graph alone (nothing runs); parameters already found as a module's weight
    (``seen``, by identity) are skipped, so a traced model's call_module layers are not listed twice.
    """
    params = dict(graph_module.named_parameters(remove_duplicate=False))
    found: dict[str, str] = {}  # parameter → the first op it feeds (its layer's kind)

    def source(arg: object) -> str | None:
        while isinstance(arg, torch.fx.Node):
            if arg.op == "get_attr":
                return str(arg.target) if str(arg.target) in params else None
            if arg.op not in ("call_function", "call_method") or not arg.args:
                return None
            name = _target_name(arg)
            if not (name in _GRAPH_VIEWS or (name == "builtins.getattr" and arg.args[1:2] and
                                             arg.args[1] in _GRAPH_TRANSPOSE_ATTRS)):
                return None
            arg = arg.args[0]
        return None

    for node in graph_module.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        op = _target_name(node)
        operands = _GRAPH_WEIGHT_OPERANDS.get(op)
        if operands is None:
            continue
        positions, keyword = operands
        args = [node.args[i] for i in positions if i < len(node.args)]
        if keyword is not None and keyword in node.kwargs:
            args.append(node.kwargs[keyword])
        for arg in args:
            target = source(arg)
            if target is not None and _is_matrix(params[target]) and id(params[target]) not in seen:
                seen.add(id(params[target]))
                found[target] = op.rpartition(".")[2]
    layers = []
    for target, kind in found.items():
        owner_path, _, param = target.rpartition(".")
        owner = graph_module.get_submodule(owner_path)
        path = ".".join(part for part in (prefix, owner_path) if part)
        layers.append(PrunableLayer(layer_name(path, param), kind, owner, param))
    return layers


def boundary(max_abs: torch.Tensor, tau: float) -> torch.Tensor:
    """β = τ · max|W|, computed in the weight's dtype (a 0-d tensor)."""
    return max_abs * tau


def boundary_mask(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean keep-mask ``|W| ≥ τ · max|W|``. τ = 0 keeps everything; an all-zero W keeps all."""
    magnitude = weight.detach().abs()
    return magnitude >= boundary(magnitude.max(), tau)


def boundary_prune(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """A new tensor ``W · 1(|W| ≥ β)``; ``weight`` is not modified."""
    return torch.where(boundary_mask(weight, tau), weight.detach(), torch.zeros((), dtype=weight.dtype))


class BoundaryPruning(prune.BasePruningMethod):
    """``torch.nn.utils.prune`` method: keep ``|W| ≥ τ · max|W|`` (unstructured).

    Use it like any PyTorch pruning method::

        BoundaryPruning.apply(model.fc, "weight", tau=0.2)   # or boundary_unstructured(...)
        prune.remove(model.fc, "weight")                      # make it permanent

    The contract of torch's own methods (``prune.L1Unstructured``):

    * ``tau``: any real number in [0, 1] (Python, numpy scalar, one-element tensor);
      ``TypeError`` for anything else (bool, str, complex), ``ValueError`` outside [0, 1] or NaN.
    * ``importance_scores`` (same shape as the parameter) are ranked instead of the weights:
      keep ``|S| ≥ τ · max|S|``.
    * Applied on top of an earlier mask, max is taken over the still-kept entries; where
      nothing is left to prune (an empty or completely pruned tensor) the mask is unchanged.
    * NaN or Inf in the ranked tensor: ``ValueError``, and the module stays as it was.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, tau: float):
        self.tau = check_tau(tau)

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """``default_mask · 1(|t · default_mask| ≥ τ · max|t · default_mask|)``.

        An empty ``t`` returns a copy of ``default_mask``; so does a completely masked one
        (max = 0, β = 0 keeps everything the default mask keeps).
        """
        check_finite(t, "BoundaryPruning: the tensor to prune", "values")
        if t.numel() == 0:
            return default_mask.clone(memory_format=torch.contiguous_format)
        magnitude = (t * default_mask).abs()
        return default_mask * (magnitude >= boundary(magnitude.max(), self.tau)).to(default_mask.dtype)

    @classmethod
    def apply(cls, module: nn.Module, name: str, tau: float,
              importance_scores: torch.Tensor | None = None) -> "BoundaryPruning":
        """Prune ``module.<name>`` like ``prune.L1Unstructured.apply`` (see the class docstring).

        ``tau`` and the ranked tensor are checked before torch's ``apply`` runs: torch
        drops an existing pruning hook before it builds the method or computes the mask,
        so a refusal there would leave an already pruned module without its hook.
        """
        check_tau(tau)
        if importance_scores is not None:
            check_finite(importance_scores, f"importance_scores for '{name}'", "values")
        elif isinstance(getattr(module, name, None), torch.Tensor):
            check_finite(getattr(module, name), f"parameter '{name}' of {type(module).__name__}")
        return super().apply(module, name, tau=tau, importance_scores=importance_scores)


def boundary_unstructured(module: nn.Module, name: str, tau: float,
                          importance_scores: torch.Tensor | None = None) -> nn.Module:
    """Functional form, like ``prune.l1_unstructured``: adds ``<name>_orig`` and ``<name>_mask``."""
    BoundaryPruning.apply(module, name, tau=tau, importance_scores=importance_scores)
    return module

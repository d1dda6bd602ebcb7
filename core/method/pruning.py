"""Boundary pruning: β_ℓ = τ · max|W_ℓ|, keep W where |W| ≥ β_ℓ, zero the rest.

Which weights are prunable:

* default: the ``weight`` of every Conv1d/2d/3d and Linear layer (optionally only the
  layers named in ``layers``);
* ``include_norm=True`` reproduces the paper's pseudocode (``hasattr(layer, 'weight')``):
  BatchNorm/LayerNorm/GroupNorm scales are pruned too. Zeroing a BatchNorm scale switches
  its channel off, which is why this option collapses a trained CNN's accuracy; it is only
  available as an explicit, labelled choice.

The formulas here are the single source of truth; the engine's incremental algorithm is
tested against :func:`boundary_mask`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable weight: the module's dotted name, its type name and the module itself."""

    name: str
    kind: str
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


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
    """The model's prunable layers in module order.

    ``include_norm`` adds normalisation layers with an affine ``weight`` (the paper's
    ``hasattr(layer, 'weight')``). ``layers`` restricts to those dotted module names; a
    name that is not a prunable layer raises ``ValueError``.
    """
    kinds = WEIGHT_LAYERS + (NORM_LAYERS if include_norm else ())
    found = [
        PrunableLayer(name, type(module).__name__, module)
        for name, module in model.named_modules()
        if isinstance(module, kinds) and isinstance(getattr(module, "weight", None), torch.Tensor)
    ]
    if layers is not None:
        wanted = list(layers)
        by_name = {layer.name: layer for layer in found}
        missing = [name for name in wanted if name not in by_name]
        if missing:
            raise ValueError(f"layer '{missing[0]}' is not a prunable layer of this model")
        found = [layer for layer in found if layer.name in set(wanted)]
    if not found:
        raise ValueError(
            "the model has no prunable layer (Conv1d/2d/3d or Linear weights"
            + (", or normalisation scales" if include_norm else "") + ")"
        )
    return found


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

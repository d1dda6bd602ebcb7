"""Which architecture a file says it holds: a registry name with its arguments, or ``torchvision:<name>``.

Every file this app writes (the packed model, the ``.pt`` bundle, the settings JSON) records
``arch`` and ``arch_kwargs``, and, for image models other than the registry's CIFAR ones, the
pre-processing (:class:`core.workloads.preprocess.Preprocess`, under ``input``). Reading them
back goes through :func:`check_file_arch` / :func:`build_file_arch`, which dispatch to the
registry (:func:`core.workloads.models.check_arch_kwargs`) or to torchvision
(:func:`core.workloads.torchvision_models.check_kwargs`); both check every argument and count
the parameters on the ``meta`` device before anything is built.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from core.workloads import torchvision_models as tv
from core.workloads.models import MAX_FILE_PARAMS, REGISTRY, build, check_arch_kwargs


def known_arch(arch: object) -> bool:
    """Whether ``arch`` names a registry architecture or an existing torchvision one."""
    if tv.is_torchvision(arch):
        return arch[len(tv.PREFIX):] in tv.architectures()
    return isinstance(arch, str) and arch in REGISTRY


def check_file_arch(arch: object, kwargs: object, label: str = "the file",
                    max_params: int = MAX_FILE_PARAMS) -> dict:
    """The checked constructor arguments of ``arch``; raises ``CheckpointError`` naming the problem.

    ``max_params`` bounds registry models; torchvision models are bounded by the smaller of it and
    :data:`core.workloads.torchvision_models.MAX_TORCHVISION_PARAMS`.
    """
    if tv.is_torchvision(arch):
        return tv.check_kwargs(arch, kwargs, label, min(max_params, tv.MAX_TORCHVISION_PARAMS))
    return check_arch_kwargs(arch, kwargs, label, max_params)


def build_file_arch(arch: object, kwargs: object, label: str = "the file",
                    max_params: int = MAX_FILE_PARAMS) -> nn.Module:
    """The untrained module ``arch`` with the file's arguments, after :func:`check_file_arch`."""
    checked = check_file_arch(arch, kwargs, label, max_params)
    if tv.is_torchvision(arch):
        return tv.build(arch, checked, label, min(max_params, tv.MAX_TORCHVISION_PARAMS))
    return build(arch, **checked)


def describe(arch: str, kwargs: Mapping | None = None) -> str:
    """A short description: the registry's, or ``torchvision resnet50 (10 classes)``."""
    if tv.is_torchvision(arch):
        classes = (kwargs or {}).get("num_classes")
        return f"torchvision {arch[len(tv.PREFIX):]}" + (f" ({classes:,} classes)" if classes else "")
    spec = REGISTRY.get(arch)
    return spec.description if spec is not None else arch

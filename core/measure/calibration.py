"""Calibration images for the repairs, and the lock-step runner they are built on.

The repairs in :mod:`core.measure.repair` need, at every layer, the activations of the
*already-repaired* model beside those of the dense model, on the same calibration images.
Running the whole model once per layer would cost a forward pass per layer; instead
:class:`Lockstep` traces the model once with ``torch.fx`` and runs the dense model and the
model under repair side by side, **one graph node at a time over every calibration batch**.
When it reaches a module that has a hook, the hook sees that module's inputs in the model
under repair and its inputs/outputs in the dense model for all batches, may change the
module (its weights, bias, BatchNorm statistics), and returns the outputs the rest of the
graph continues from. The whole repair then costs two forward passes plus the hooks' work.

Memory: the activations still needed downstream, for every calibration image, in both
models (for the CIFAR ResNet-18 and 512 images, under 1 GB); each is freed after its last use.

A model must be traceable by ``torch.fx.symbolic_trace`` (every registry architecture is);
otherwise :class:`TraceError` says so.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from core.measure.accuracy import calibration_images
from core.workloads.data import CIFAR_MEAN, CIFAR_STD


class TraceError(ValueError):
    """The model cannot be run node by node (``torch.fx`` cannot trace it)."""


def calibration_split(n_fit: int, n_holdout: int, seed: int = 0, mean: tuple[float, ...] = CIFAR_MEAN,
                      std: tuple[float, ...] = CIFAR_STD,
                      root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_fit`` fitting and ``n_holdout`` held-out images, disjoint, from the CIFAR-10 *training* split.

    They are :func:`core.measure.accuracy.calibration_images` (augmented as in training, fixed by
    ``seed``): the first ``n_fit`` fit the repair, the other ``n_holdout`` only measure it. The
    test split is never read.
    """
    images = calibration_images(n_fit + n_holdout, seed=seed, mean=mean, std=std, root=root)
    return images[:n_fit], images[n_fit:]


@dataclass
class Step:
    """What a hook sees at one module node, over every calibration batch.

    ``inputs``: the module's input in the model under repair; ``dense_inputs`` and
    ``dense_outputs``: its input and output in the dense model (read-only). ``users`` are the
    graph's consumers of this node's output (module names for module calls, else the op).
    """

    name: str
    module: nn.Module
    dense_module: nn.Module
    inputs: list[torch.Tensor]
    dense_inputs: list[torch.Tensor]
    dense_outputs: list[torch.Tensor]
    input_from: str | None
    users: tuple[str, ...]

    def forward(self) -> list[torch.Tensor]:
        """The module's outputs in the model under repair, with its current parameters."""
        return [self.module(x) for x in self.inputs]


Hook = Callable[[Step], list[torch.Tensor] | None]


def _label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else f"{node.op}:{getattr(node.target, '__name__', node.target)}"


class Lockstep:
    """Run ``dense`` and ``model`` (same architecture) side by side over ``batches``, node by node.

    ``model`` is modified only by the hooks (the caller passes its own copy). Both are run in
    eval mode, without autograd.
    """

    def __init__(self, dense: nn.Module, model: nn.Module, batches: Sequence[torch.Tensor]):
        try:
            self.graph = fx.symbolic_trace(dense).graph
        except Exception as err:  # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
            raise TraceError(f"{type(dense).__name__} cannot be traced by torch.fx ({type(err).__name__}: {err}); "
                             "bias correction and reconstruction need a traceable model — use method 'bn'") from err
        self.dense, self.model, self.batches = dense, model, list(batches)
        self.nodes = list(self.graph.nodes)
        calls: dict[str, int] = {}
        for node in self.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        #: module name → how many times the forward calls it (a shared module is called more than once)
        self.calls = calls

    def module_order(self) -> list[str]:
        """Module names in the order the forward pass calls them (first call)."""
        seen: list[str] = []
        for node in self.nodes:
            if node.op == "call_module" and node.target not in seen:
                seen.append(node.target)
        return seen

    @staticmethod
    def _attr(root: nn.Module, target: str):
        value = root
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def _run(self, node: fx.Node, env: dict, root: nn.Module, b: int):
        args = fx.node.map_arg(node.args, lambda n: env[n][b])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][b])
        if node.op == "call_module":
            return root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        raise AssertionError(node.op)

    @torch.no_grad()
    def run(self, hooks: dict[str, Hook], between: Callable[[], None] | None = None) -> None:
        """Step through the graph; ``hooks[name](step)`` runs where module ``name`` is called.

        A hook returns the module's outputs per batch (or None: the module is simply run with
        its parameters as the hook left them). ``between()`` is called before each hooked
        module (a cancel check may raise there).
        """
        last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for used in node.all_input_nodes:
                last_use[used] = i
        dense_env: dict[fx.Node, list] = {}
        env: dict[fx.Node, list] = {}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise TraceError(f"the model's forward takes {len(placeholders)} inputs; the repairs need exactly one")
        was = (self.dense.training, self.model.training)
        self.dense.eval()
        self.model.eval()
        try:
            for i, node in enumerate(self.nodes):
                if node.op == "placeholder":
                    dense_env[node] = list(self.batches)
                    env[node] = list(self.batches)
                elif node.op == "get_attr":
                    dense_env[node] = [self._attr(self.dense, node.target)] * len(self.batches)
                    env[node] = [self._attr(self.model, node.target)] * len(self.batches)
                elif node.op == "output":
                    pass
                else:
                    dense_env[node] = [self._run(node, dense_env, self.dense, b) for b in range(len(self.batches))]
                    hook = hooks.get(node.target) if node.op == "call_module" else None
                    if hook is None:
                        env[node] = [self._run(node, env, self.model, b) for b in range(len(self.batches))]
                    else:
                        if between is not None:
                            between()
                        if len(node.all_input_nodes) != 1 or node.kwargs:
                            raise TraceError(f"module '{node.target}' is called with {len(node.all_input_nodes)} "
                                             "inputs; the repairs handle single-input modules only")
                        source = node.all_input_nodes[0]
                        step = Step(
                            name=node.target, module=self.model.get_submodule(node.target),
                            dense_module=self.dense.get_submodule(node.target), inputs=env[source],
                            dense_inputs=dense_env[source], dense_outputs=dense_env[node],
                            input_from=source.target if source.op == "call_module" else None,
                            users=tuple(_label(user) for user in node.users))
                        outputs = hook(step)
                        env[node] = step.forward() if outputs is None else outputs
                for used in node.all_input_nodes:
                    if last_use.get(used) == i:
                        dense_env.pop(used, None)
                        env.pop(used, None)
        finally:
            self.dense.train(was[0])
            self.model.train(was[1])

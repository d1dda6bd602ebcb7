"""Channel-granularity boundary pruning: the boundary rule one level up, giving a physically smaller model.

The rule, per coupled group of channels g (channels that must go together: a conv's output
channels with its BatchNorm and every consumer's input channels, the channels joined by a
residual addition, a depthwise conv's in/out channels, the inputs of a Linear after a flatten,
the parts of a concatenation)::

    s_c = ‖W_c · γ_c/σ_c‖               the norm (L2 by default, or L1) of the weights that *produce*
                                         channel c: row c of every Conv/Linear writing into the group
                                         (for a residual stream: every block's last conv and the stem),
                                         each with the BatchNorm right after it folded in (γ_c/√(var_c+ε)),
                                         i.e. the weights the network applies at inference. Without the
                                         fold (``fold_bn=False``) a conv→BN filter's norm says nothing:
                                         BatchNorm divides it out.
    β_g = τ_ch · max_c s_c              τ_ch ∈ [0, 1], per group (a layer's override applies to its group)
    remove every channel with s_c < β_g; never all of them: at least the top-scored channel stays

The groups come from Torch-Pruning's dependency graph (``torch_pruning.DependencyGraph``,
traced once per model); slicing uses Torch-Pruning's own per-layer pruning functions, each
called *once* per (module, dimension) with every index to remove in the original
coordinates (so a concatenation's offsets stay right). The user's model is never modified:
:class:`ChannelPruner` keeps a private deep copy, and every :meth:`ChannelPruner.apply`
prunes a fresh copy of that. Weight-level τ and θ compose: :class:`core.method.engine.Engine`
runs on the smaller model as on any other.

A module without parameters that changes the channel count (the option-A shortcut of the
CIFAR ResNet-20: subsample and zero-pad) is a *boundary*: the groups on either side of it are
not pruned (its channel offsets cannot be sliced), and the group table says so. Groups with a
grouped (not depthwise) convolution are not pruned either.

MACs are counted (multiply-accumulates of every Conv/Linear, one input sample) from the
output sizes recorded once and the kept channel counts: no forward pass per setting.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable, Mapping

import pandas as pd
import torch
from torch import nn

from core.method.channel_config import (
    NORMS,
    ChannelConfig,
    ChannelError,
    ChannelGroup,
    ChannelResult,
)
from core.method.channel_slicing import (
    LAYERS,
    Boundary,
    Item,
    channel_boundaries,
    default_input,
    failing_module,
    layer_shapes,
    own_tensors,
    slice_fast,
    structure_copy,
)

DEFAULT = ChannelConfig()  # keeps every channel

__all__ = ["NORMS", "ChannelConfig", "ChannelError", "ChannelGroup", "ChannelPruner", "ChannelResult"]


class ChannelPruner:
    """Traced once per model; :meth:`apply` gives a smaller copy per setting (the live slider's call).

    ``example_input``: one input batch for tracing (default: 1×C×32×32 for a conv net, 1×F for
    an MLP); ``protect``: Conv/Linear names whose output channels are never removed (the
    output layer, the last Conv/Linear the forward calls, always is). ``model`` is never modified.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor | None = None, protect: Iterable[str] = ()):
        import torch_pruning as tp

        if not isinstance(model, nn.Module):
            raise ChannelError(f"model must be an nn.Module, got {type(model).__name__}")
        with torch.no_grad():
            self.dense = copy.deepcopy(model).eval()
        self.example = default_input(self.dense) if example_input is None else example_input
        self._names = {m: n for n, m in self.dense.named_modules()}
        self._by_name = dict(self.dense.named_modules())
        try:
            self._shapes = layer_shapes(self.dense, self.example)
        except Exception as err:  # the model's own forward: any error, said in one sentence
            raise ChannelError(f"{type(model).__name__} does not run on an input of shape {tuple(self.example.shape)} "
                               f"({type(err).__name__}: {str(err)[:200]}); pass example_input") from err
        if not self._shapes:
            raise ChannelError(f"{type(model).__name__} has no Conv/Linear layer the forward pass calls")
        order = list(self._shapes)
        protect = set(protect) | {order[-1]}
        unknown = protect - set(self._names.values())
        if unknown:
            raise ChannelError(f"protect names '{min(unknown)}', which is not a module of the model")
        boundaries = channel_boundaries(self.dense, self.example)
        custom = {type(m): Boundary() for m in boundaries}
        try:
            self._graph = tp.DependencyGraph().build_dependency(
                self.dense, example_inputs=self.example, customized_pruners=custom, verbose=False)
            raw = list(self._graph.get_all_groups(ignored_layers=[self.dense.get_submodule(n) for n in protect]))
        except Exception as err:  # Torch-Pruning raises many kinds while tracing
            where = failing_module(err, self._names)
            raise ChannelError(f"Torch-Pruning cannot trace {type(model).__name__}'s dependency graph"
                               f"{f' at {where}' if where else ''} ({type(err).__name__}: {str(err)[:200]}); "
                               "channel pruning needs a model whose forward autograd can trace") from err
        self.groups: list[ChannelGroup] = []
        self._items: list[list[Item]] = []
        for group in raw:
            items, reason = self._read_group(group, boundaries)
            if not items:
                continue
            producers = tuple(dict.fromkeys(i.name for i in items if i.kind == "out" and self._is_layer(i.name)))
            if not producers:
                continue
            channels = int(items[0].root.max()) + 1
            self._items.append(items)
            self.groups.append(ChannelGroup(producers[0], channels, producers,
                                            tuple(dict.fromkeys(i.name for i in items)), torch.zeros(0), reason))
        self._scores: dict[str, dict[str, torch.Tensor]] = {}
        self._verified: set[frozenset[str]] = set()
        self.group_of = {name: g.name for g in self.groups for name in g.producers}
        self.macs_dense = self._count(self._no_cuts())[0]
        with torch.no_grad():
            out = self.dense(self.example)
        self._out_shape = out.shape if isinstance(out, torch.Tensor) else None
        self._verify = True
        for i, group in enumerate(self.groups):  # each group cut alone once: a mis-modelled operation shows here
            if group.prunable and group.channels > 1:
                remove = torch.zeros(group.channels, dtype=torch.bool)
                remove[::2] = True
                try:
                    self.build({group.name: remove})
                except ChannelError as err:
                    self.groups[i] = dataclasses.replace(group, reason=f"cutting it breaks the forward pass: {err}")
        self._verify = False  # apply() runs no forward pass (the live slider's budget)
        self.params_dense = sum(p.numel() for p in self.dense.parameters())

    # ---------------------------------------------------------------- reading Torch-Pruning's groups

    def _is_layer(self, name: str) -> bool:
        return isinstance(self._by_name[name], LAYERS)

    def _read_group(self, group, boundaries: dict[nn.Module, str]) -> tuple[list[Item], str]:
        items: list[Item] = []
        reason = ""
        for entry in group.items:
            dep, idxs = entry.dep, entry.idxs
            roots = getattr(entry, "root_idxs", idxs)  # each index's channel in the group's root layer
            module = dep.target.module
            if module in boundaries:
                reason = (f"its channels pass through '{boundaries[module]}', which changes the channel count "
                          "without weights (e.g. a zero-padding shortcut): its offsets cannot be sliced")
                continue
            name = self._names.get(module) if isinstance(module, nn.Module) else None
            if name is None:
                if isinstance(module, nn.Parameter):
                    reason = reason or "it includes a parameter outside any module (not sliced here)"
                continue  # an operation node (add, relu, flatten...): nothing to slice
            if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.in_channels:
                reason = reason or (f"'{name}' is a grouped convolution (groups={module.groups}) whose groups "
                                    "cannot be split channel by channel")
            kind = "out" if self._graph.is_out_channel_pruning_fn(dep.handler) else "in"
            plain = torch.tensor([int(i) for i in idxs], dtype=torch.int64)
            root = torch.tensor([int(i) for i in roots], dtype=torch.int64)
            pruner = self._graph.get_pruner_of_module(module)
            size = pruner.get_out_channels(module) if kind == "out" else pruner.get_in_channels(module)
            items.append(Item(name, kind, dep.handler, dep.target.pruning_dim, plain, root, int(size or 0)))
        return items, reason

    # ---------------------------------------------------------------- the rule

    def _bn_after(self, name: str) -> nn.modules.batchnorm._BatchNorm | None:
        """The BatchNorm that is the only consumer of layer ``name``'s output, if any."""
        node = self._graph.module2node.get(self.dense.get_submodule(name))
        users = [] if node is None else node.outputs
        if len(users) == 1 and isinstance(users[0].module, nn.modules.batchnorm._BatchNorm):
            return users[0].module
        return None

    def scores(self, norm: str = "l2", fold_bn: bool = True) -> dict[str, torch.Tensor]:
        """Per group, s_c: the norm of every producing layer's weights of channel c (cached per norm and fold)."""
        if norm not in NORMS:
            raise ChannelError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        key = f"{norm}/{fold_bn}"
        if key not in self._scores:
            out = {}
            for group, items in zip(self.groups, self._items):
                total = torch.zeros(group.channels, dtype=torch.float64)
                for item in items:
                    if item.kind != "out" or item.name not in group.producers:
                        continue
                    module = self.dense.get_submodule(item.name)
                    weight = module.weight.detach().double()
                    if getattr(module, "transposed", False):  # ConvTranspose: (in, out/groups, ...)
                        weight = weight.transpose(0, 1)
                    rows = weight.reshape(weight.shape[0], -1)
                    bn = self._bn_after(item.name) if fold_bn else None
                    if bn is not None and bn.running_var is not None and len(bn.running_var) == len(rows):
                        scale = bn.running_var.double().add(bn.eps).rsqrt()
                        rows = rows * (scale * bn.weight.detach().double() if bn.affine else scale).unsqueeze(1)
                    rows = rows[item.idx]
                    part = rows.pow(2).sum(1) if norm == "l2" else rows.abs().sum(1)
                    total.index_add_(0, item.root, part)
                out[group.name] = (total.sqrt() if norm == "l2" else total).float()
            self._scores[key] = out
        return self._scores[key]

    def _group_tau(self, config: ChannelConfig) -> dict[str, float]:
        taus = {g.name: config.tau for g in self.groups}
        setter: dict[str, str] = {}
        for layer, tau in config.layer_tau:
            group = self.group_of.get(layer)
            if group is None:
                known = [g for g in self.groups if layer in g.members]
                if not known:
                    raise ChannelError(f"layer_tau names '{layer}', which writes no prunable channel group of the "
                                       f"model (groups are named after their first layer: {', '.join(self.group_of)[:300]})")
                group = known[0].name
            if group in setter and taus[group] != tau:
                raise ChannelError(f"layer_tau sets '{layer}' to {tau} and '{setter[group]}' to {taus[group]}, but their "
                                   f"channels are coupled (group '{group}'): they must share one τ_ch")
            taus[group], setter[group] = tau, layer
        return taus

    def removed(self, config: ChannelConfig) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
        """Per group, the boolean mask of removed channels under ``config``, and the group table."""
        masks, rows = self._removed(config)
        return masks, pd.DataFrame(rows)

    def _removed(self, config: ChannelConfig) -> tuple[dict[str, torch.Tensor], list[dict]]:
        scores = self.scores(config.norm, config.fold_bn)
        taus = self._group_tau(config)
        masks, rows = {}, []
        for group, items in zip(self.groups, self._items):
            s = scores[group.name]
            tau = taus[group.name]
            beta = tau * float(s.max()) if len(s) else 0.0
            note = group.reason
            if group.reason or tau == 0.0:
                remove = torch.zeros(group.channels, dtype=torch.bool)
                beta = 0.0 if group.reason else beta
            else:
                remove = s < beta
                if bool(remove.all()):
                    remove[int(s.argmax())] = False
                    note = "kept 1: τ_ch would remove every channel"
                for item in items:  # every layer writing into the group keeps a channel (a concatenation's parts)
                    if item.kind == "out" and item.name in group.producers and bool(remove[item.root].all()):
                        remove[item.root[int(s[item.root].argmax())]] = False
                        note = note or f"kept 1 of '{item.name}': τ_ch would remove all its channels"
            masks[group.name] = remove
            rows.append({"name": group.name, "channels": group.channels, "kept": int((~remove).sum()), "tau": tau,
                         "beta": beta, "max_score": float(s.max()) if len(s) else 0.0,
                         "prunable": group.prunable, "note": note})
        return masks, rows

    # ---------------------------------------------------------------- cutting

    def _no_cuts(self) -> dict[tuple[str, str], tuple[object, int, torch.Tensor, int]]:
        return {}

    def _cuts(self, masks: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], tuple[object, int, torch.Tensor, int]]:
        """Per (module, "out"/"in"): handler, pruning dim, indices to remove (original coordinates), size."""
        cuts: dict[tuple[str, str], list] = {}
        for group, items in zip(self.groups, self._items):
            remove = masks.get(group.name)
            if remove is None or not bool(remove.any()):
                continue
            for item in items:
                idx = item.idx[remove[item.root]]
                key = (item.name, item.kind)
                if key in cuts:
                    cuts[key][2] = torch.cat([cuts[key][2], idx])
                else:
                    cuts[key] = [item.handler, item.pruning_dim, idx, item.size]
        return {k: (h, d, torch.unique(i), s) for k, (h, d, i, s) in cuts.items()}

    def _count(self, cuts) -> tuple[int, list[dict]]:
        """Counted MACs (per sample) of every Conv/Linear under ``cuts``, and one row per layer."""
        total, rows = 0, []
        for name, (positions, kernel) in self._shapes.items():
            module = self._by_name[name]
            conv = isinstance(module, nn.modules.conv._ConvNd)
            c_out = module.out_channels if conv else module.out_features
            c_in = module.in_channels if conv else module.in_features
            groups = module.groups if conv else 1
            out_cut = len(cuts[(name, "out")][2]) if (name, "out") in cuts else 0
            in_cut = len(cuts[(name, "in")][2]) if (name, "in") in cuts else 0
            k_out, k_in = c_out - out_cut, c_in - in_cut
            depthwise = conv and groups > 1 and groups == c_in
            per_in = 1 if depthwise else k_in // groups
            dense_per_in = 1 if depthwise else c_in // groups
            macs = positions * k_out * per_in * kernel
            total += macs
            rows.append({"name": name, "group": self.group_of.get(name, ""), "out_channels": c_out, "kept_out": k_out,
                         "in_channels": c_in, "kept_in": k_in, "macs": macs,
                         "macs_dense": positions * c_out * dense_per_in * kernel})
        return total, rows

    def macs(self, config: ChannelConfig) -> int:
        """Counted MACs per sample under ``config``, without building the model (fast: for bisection)."""
        return self.macs_of(self._removed(config)[0])

    def masks_for_counts(self, counts: Mapping[str, int], config: ChannelConfig = DEFAULT) -> dict[str, torch.Tensor]:
        """Per group, the mask of removed channels that keeps its ``counts[name]`` highest-scored ones.

        A count is clamped to 1 … channels; groups not named, and groups that cannot be pruned,
        keep every channel. Scores as :meth:`scores` under ``config``'s norm and BN folding.
        """
        scores = self.scores(config.norm, config.fold_bn)
        masks = {}
        for group in self.groups:
            remove = torch.zeros(group.channels, dtype=torch.bool)
            if group.name in counts and group.prunable:
                count = min(max(int(counts[group.name]), 1), group.channels)
                remove[torch.argsort(scores[group.name], descending=True, stable=True)[count:]] = True
            masks[group.name] = remove
        return masks

    def group_macs(self) -> dict[str, int]:
        """Per group, the dense counted MACs of every Conv/Linear whose output or input channels are the group's."""
        dense = {row["name"]: row["macs_dense"] for row in self._count({})[1]}
        return {group.name: sum(dense[name] for name in {item.name for item in items} if name in dense)
                for group, items in zip(self.groups, self._items)}

    def macs_of(self, masks: Mapping[str, torch.Tensor]) -> int:
        """Counted MACs per sample with ``masks`` (per group, the removed channels) cut; no model is built."""
        return self._count(self._cuts(masks))[0]

    def build(self, masks: Mapping[str, torch.Tensor], share: bool = False) -> tuple[nn.Module, dict, dict]:
        """A pruned copy of the dense model, and the kept out/in indices per cut module.

        Every tensor of the copy is new (the dense snapshot's are never shared or modified): a
        cut Conv/Linear/BatchNorm is gathered once per tensor (both dimensions), any other cut
        module gets fresh copies of its tensors and then Torch-Pruning's own pruning function,
        and every uncut tensor is cloned (no full deep copy first: half the memory traffic), unless
        ``share``: then the uncut tensors are the dense snapshot's own (read-only; the live view).
        """
        cuts = self._cuts(masks)
        kept_out, kept_in = {}, {}
        for (name, kind), (_, _, idx, size) in cuts.items():
            keep = torch.ones(size, dtype=torch.bool)
            keep[idx] = False
            (kept_out if kind == "out" else kept_in)[name] = keep.nonzero().flatten()
        with torch.no_grad():
            shared = {id(t): t for t in (*self.dense.parameters(), *self.dense.buffers())}
            model = structure_copy(self.dense)
            done: set[str] = set()
            copies = dict(model.named_modules())
            for name in {n for n, _ in cuts}:
                module = copies[name]
                if slice_fast(module, kept_out.get(name), kept_in.get(name)):
                    done.add(name)
                    continue
                own_tensors(module)
                done.add(name)
                for kind in ("out", "in"):
                    if (name, kind) in cuts:
                        handler, dim, idx, _ = cuts[(name, kind)]
                        handler.__self__.pruning_dim = dim  # as Torch-Pruning's Dependency.__call__ does
                        handler(module, idx.tolist())
            for name, module in copies.items():
                if name not in done and not share:
                    own_tensors(module, recurse=False, only=shared)
            model.eval()
            if not self._verify:
                return model, kept_out, kept_in
            combination = frozenset(name for name, remove in masks.items() if bool(remove.any()))
            if combination in self._verified:
                return model, kept_out, kept_in
            try:  # an operation Torch-Pruning mis-modelled shows here, as a sentence, not later as a traceback
                out = model(self.example)
            except Exception as err:
                cut = sorted(name for name, remove in masks.items() if bool(remove.any()))
                raise ChannelError(f"the channel-pruned {type(self.dense).__name__} no longer runs after cutting "
                                   f"groups {', '.join(cut)[:200]} ({type(err).__name__}: {str(err)[:160]}); "
                                   "protect those layers (protect=...) or give them τ_ch = 0") from err
            if isinstance(out, torch.Tensor) and out.shape != self._out_shape:
                raise ChannelError(f"the channel-pruned model's output has shape {tuple(out.shape)}, the dense "
                                   f"model's {tuple(self._out_shape)}: a cut reached the output")
            self._verified.add(combination)  # these groups cut together ran once: the next slider move skips the check
        return model, kept_out, kept_in

    def apply(self, config: ChannelConfig, share: bool = False) -> ChannelResult:
        """The smaller model under ``config`` (β per group), with its counted MACs and parameters.

        ``share=True`` (the live slider's call): tensors of uncut layers are the pruner's own, not
        copies (read-only; see :attr:`ChannelResult.shared`); the pruner's snapshot is never modified.
        """
        if not isinstance(config, ChannelConfig):
            raise ChannelError(f"config must be a ChannelConfig, got {type(config).__name__}")
        start = time.perf_counter()
        masks, rows = self._removed(config)
        return self._result(config, masks, rows, start, share)

    def apply_kept(self, kept: Mapping[str, Iterable[int]], config: ChannelConfig = DEFAULT) -> ChannelResult:
        """The smaller model that keeps exactly ``kept`` (per group name, as :meth:`ChannelResult.record` stores)."""
        start = time.perf_counter()
        by_name = {g.name: g for g in self.groups}
        masks = {}
        for name, channels in kept.items():
            group = by_name.get(name)
            if group is None:
                raise ChannelError(f"the file names channel group '{name}', which this architecture does not have: "
                                   "it was saved from a different model")
            idx = torch.as_tensor(list(channels), dtype=torch.int64)
            if len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= group.channels:
                raise ChannelError(f"the file keeps channels of group '{name}' outside 0…{group.channels - 1} "
                                   "(or none): it was saved from a different model")
            remove = torch.ones(group.channels, dtype=torch.bool)
            remove[idx] = False
            masks[name] = remove
        _, rows = self._removed(ChannelConfig(norm=config.norm, fold_bn=config.fold_bn))
        for row, g in zip(rows, self.groups):
            row["kept"] = g.channels - int(masks[g.name].sum()) if g.name in masks else g.channels
        return self._result(config, masks, rows, start)

    def _result(self, config: ChannelConfig, masks, rows: list[dict], start: float, share: bool = False) -> ChannelResult:
        model, kept_out, kept_in = self.build(masks, share)
        macs, layer_rows = self._count(self._cuts(masks))
        kept = {g.name: (~masks[g.name]).nonzero().flatten().tolist() if g.name in masks else list(range(g.channels))
                for g in self.groups}
        return ChannelResult(model=model, config=config, kept=kept, group_rows=rows, layer_rows=layer_rows,
                             macs=macs, macs_dense=self.macs_dense, params=sum(p.numel() for p in model.parameters()),
                             params_dense=self.params_dense, kept_out=kept_out, kept_in=kept_in,
                             seconds=time.perf_counter() - start, shared=share,
                             input_shape=tuple(self.example.shape[1:]))

    def zeroed(self, result: ChannelResult) -> nn.Module:
        """The dense model with every removed channel's producing rows (Conv/Linear/norm weight and bias)
        zeroed: for ReLU networks it computes what ``result.model`` computes (the exactness reference)."""
        with torch.no_grad():
            model = copy.deepcopy(self.dense)
            for name, keep in result.kept_out.items():
                module = model.get_submodule(name)
                drop = torch.ones(module.weight.shape[0], dtype=torch.bool)
                drop[keep] = False
                for param in (module.weight, getattr(module, "bias", None)):
                    if param is not None:
                        param[drop] = 0
        return model.eval()

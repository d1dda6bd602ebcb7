"""First paint of the Explore page, server side: slider moves replayed through its update path.

    python benchmarks/update_latency.py                     # the app's default model
    python benchmarks/update_latency.py pretrained:resnet18 --moves 40
    python benchmarks/update_latency.py torchvision:resnet50 --moves 20   # random init, 224 px, 1,000 classes
    python benchmarks/update_latency.py pretrained:resnet18 --granularity channel   # τ_ch moves, channel mode

Each move is a τ step of ±0.01 (every fourth a θ step) sent through
:meth:`core.services.session.ExploreSession.update` exactly as the page sends it: the engine
step, the histogram and the lookups of figures already measured. The accuracy and latency
that follow are queued work measured by ``benchmarks/progressive_accuracy.py`` and the load
test. The table has the time of each part (ms) and the last line the p50/p95 of the whole
update. Nothing here asserts a speed. With ``--granularity channel`` each move is a τ_ch step of
±0.01 sent through :meth:`core.services.channel_session.ChannelSession.update` (the smaller model,
the group's scores, the counted MACs), after the one-off trace of the dependency graph.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.common.timing import percentile  # noqa: E402
from core.method.config import CompressionConfig  # noqa: E402
import core.workloads.torchvision_models as tv  # noqa: E402
from core.services.choices import LoadedModel, load_choice, model_choices, torchvision_loaded  # noqa: E402
from core.services.session import ExploreRequest, ExploreSession  # noqa: E402
from core.services.threads import configure_threads  # noqa: E402


def load_model(key: str) -> LoadedModel:
    """A picker key (``pretrained:resnet20``…), or ``torchvision:<name>``: that architecture with
    random weights (seed 0) and ImageNet's 224 px pre-processing, as the sidebar builds it."""
    kind, _, name = key.partition(":")
    if kind != "torchvision":
        return load_choice(key)
    torch.manual_seed(0)
    model = tv.build(name)
    arch = tv.arch_name(tv.short_name(name))
    return torchvision_loaded(key, f"torchvision {name} (random init)", arch, model, {}, None,
                              "random weights, seed 0", "torch.manual_seed(0)")


def measure_updates(key: str, moves: int = 40, *, batch: int = 1, theta_every: int = 4,
                    seed: int = 0) -> pd.DataFrame:
    """Replay ``moves`` slider moves (τ steps of ±0.01, every ``theta_every``-th a θ step) through
    :meth:`ExploreSession.update` as the Explore page does; one row of timings (ms) per move."""
    start = time.perf_counter()
    session = ExploreSession(load_model(key))
    rng = random.Random(seed)
    tau, theta = 0.2, 0.3
    layer = session.largest_layer()

    def request() -> ExploreRequest:
        return ExploreRequest(config=CompressionConfig(tau=tau, theta=theta), layer=layer, latency_batch=batch)

    session.update(request())  # the page's first load (engine, data, dense references): not a slider move
    print(f"{key}: model loaded and first view (engine built) in {time.perf_counter() - start:.1f} s")
    rows = []
    for i in range(moves):
        if theta_every and i % theta_every == theta_every - 1:
            theta = round(min(0.9, max(0.05, theta + rng.choice((-0.01, 0.01)))), 2)
        else:
            tau = round(min(0.6, max(0.0, tau + rng.choice((-0.01, 0.01, 0.02)))), 2)
        view = session.update(request())
        rows.append({"move": i + 1, "tau": tau, "theta": theta, **{k: 1e3 * v for k, v in view.timings.items()}})
    return pd.DataFrame(rows)


def measure_channel_updates(key: str, moves: int = 40, *, batch: int = 1, seed: int = 0) -> pd.DataFrame:
    """Replay ``moves`` τ_ch moves (±0.01, 0.2…0.7) through the channel mode's update; one row of timings (ms) per move."""
    from core.method.channel_config import ChannelConfig

    start = time.perf_counter()
    session = ExploreSession(load_model(key))
    rng = random.Random(seed)
    tau = 0.4
    group = session.channels.largest_group()  # traces the dependency graph once
    session.channels.update(ChannelConfig(tau=tau), group, "none", batch, "cpu")
    print(f"{key}: model loaded, dependency graph traced and first view in {time.perf_counter() - start:.1f} s")
    rows = []
    for i in range(moves):
        tau = round(min(0.7, max(0.2, tau + rng.choice((-0.01, 0.01, 0.02)))), 2)
        view = session.channels.update(ChannelConfig(tau=tau), group, "none", batch, "cpu")
        rows.append({"move": i + 1, "tau": tau, "theta": None, **{k: 1e3 * v for k, v in view.timings.items()}})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the Explore page's update path for a series of slider moves.")
    parser.add_argument("model", nargs="?", default=None,
                        help="picker key, e.g. pretrained:resnet20 (default: the app's default model)")
    parser.add_argument("--moves", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1, help="the page's latency batch size (part of the request)")
    parser.add_argument("--granularity", choices=("weight", "channel"), default="weight",
                        help="weight: τ/θ moves (the default view); channel: τ_ch moves in channel mode")
    args = parser.parse_args(argv)
    threads = configure_threads()
    key = args.model or model_choices()[0].key
    if args.granularity == "channel":
        frame = measure_channel_updates(key, args.moves, batch=args.batch)
    else:
        frame = measure_updates(key, args.moves, batch=args.batch)
    total = list(frame["total"])
    print(f"{key}: {len(frame)} slider moves, torch threads {threads}")
    print(frame.drop(columns=["move", "tau", "theta"]).describe(percentiles=[0.5, 0.95]).round(1).to_string())
    print(f"first paint (server-side compute) p50 {statistics.median(total):.0f} ms, p95 {percentile(total, 95):.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Tune page's granularity tradeoff as a queued, cancellable job shared by every session (no Streamlit).

:func:`tradeoff` starts (or joins) one :class:`core.services.tune_jobs.TuneJob` around
:func:`core.measure.granularity_tradeoff.run_tradeoff`: accuracy, counted MACs and measured
torch-eager latency of weight and channel granularity, with and without repair. As every Tune job
(:mod:`core.services.tune_jobs`): each row is one turn on the shared compute queue, ``partial`` is the
frame of rows so far, a cancel stops it within a layer or a repair step, and the rows measured before
stay in the disk cache, so running it again resumes. The channel rows use the model's traced pruner
shared with Explore (:func:`core.services.channel_session.shared_pruner`, read-only, under its lock).
"""
from __future__ import annotations

from collections.abc import Hashable

import pandas as pd

from core.common.steps import turn
from core.measure.accuracy import eval_data
from core.measure.granularity_tradeoff import TradeoffConfig, run_tradeoff, tradeoff_plan
from core.method.channel_config import ChannelConfig, ChannelError, ChannelResult
from core.services.choices import LoadedModel
from core.services.jobs import Job
from core.services.tune_jobs import _model_id, _start


def supported(loaded: LoadedModel) -> str | None:
    """None when ``loaded`` can be measured here, else why not (one sentence)."""
    if loaded.input_kind != "cifar10":
        return ("the granularity tradeoff measures accuracy on CIFAR-10 test images; "
                f"{loaded.label} takes {loaded.input_kind} inputs")
    return None


def tradeoff(loaded: LoadedModel, config: TradeoffConfig, watcher: Hashable) -> Job:
    """The tradeoff grid of ``config`` for ``loaded`` on CIFAR-10; the job's result is run_tradeoff's frame.

    A model that cannot be channel-pruned ends the job with :class:`ChannelError` (its message is the sentence
    to show); a model that does not take CIFAR-10 images, with ``ValueError`` (:func:`supported`).
    """
    key = ("tradeoff", loaded.key, config)
    where = {"model_id": _model_id(loaded), "mean": loaded.mean, "std": loaded.std}

    def work(job: Job) -> pd.DataFrame:
        reason = supported(loaded)
        if reason is not None:
            raise ValueError(reason)
        from core.services.channel_session import shared_pruner

        with turn():
            eval_data("test", tuple(loaded.mean), tuple(loaded.std))  # decoded once per process, before the estimate
            shared = shared_pruner(loaded)  # traced once per model and process (seconds for a ResNet-18)

        def apply_channels(setting: ChannelConfig) -> ChannelResult:
            with shared.lock:
                return shared.pruner.apply(setting)  # its own tensors: the repairs copy it anyway

        job.plan(tradeoff_plan(loaded.model, config, **where))
        return run_tradeoff(loaded.model, config, **where, apply_channels=apply_channels,
                            on_progress=job.progress, on_rows=job.publish)

    return _start(key, work, watcher, "granularity tradeoff")


__all__ = ["ChannelError", "TradeoffConfig", "supported", "tradeoff"]

"""Cooperative steps for long measurements: where a running job may be cancelled and where it takes its turn.

A long measurement in ``core`` (a sweep, the sensitivity map, a per-layer check) is a loop of
*steps* (a row, a cell, a candidate). It knows nothing of jobs, queues or pages; it only marks

* :func:`turn`: the body is one step of work. Inside a job it takes the job's turn on the shared
  compute queue (installed by :func:`job_steps`); elsewhere (the command line, a test) it does nothing;
* :func:`checkpoint`: a point where the job running in this thread may stop. It calls the job's
  check, which raises (for example :class:`Cancelled`) once the job is cancelled; outside a job it
  does nothing;
* :func:`interruptible`: a checkpoint before every leaf module's forward of a model *the caller
  owns* (a private copy), so that a cancel takes effect within one layer instead of one batch;
* :func:`cancel_requested`: the same question as a flag, for work that takes a ``cancel`` callable.

The job installs its check and its turn for its worker thread with :func:`job_steps`; both are
per thread, so other sessions' threads are never affected. Nothing here changes a figure: the
steps run exactly as they would without a job.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from torch import nn

_local = threading.local()


class Cancelled(Exception):
    """A job stopped at a checkpoint because it was cancelled (``done`` of ``total`` steps finished)."""

    def __init__(self, done: int = 0, total: int = 0):
        self.done, self.total = done, total
        super().__init__(f"cancelled after {done} of {total} steps" if total else "cancelled")


@contextmanager
def job_steps(check: Callable[[], None],
              turn: Callable[[], AbstractContextManager] | None = None) -> Iterator[None]:
    """In the body, this thread's checkpoints call ``check`` and its steps run inside ``turn()``.

    ``check`` raises to stop the job (it is also called before every step); ``turn`` returns a
    context manager for one step (a slot on a compute queue). Nested uses restore the outer ones.
    """
    before = (getattr(_local, "check", None), getattr(_local, "turn", None), getattr(_local, "depth", 0))
    _local.check, _local.turn, _local.depth = check, turn, 0
    try:
        yield
    finally:
        _local.check, _local.turn, _local.depth = before


def in_job() -> bool:
    """Whether this thread runs a job's steps (:func:`job_steps`)."""
    return getattr(_local, "check", None) is not None


def checkpoint() -> None:
    """Stop here if this thread's job was cancelled (its check raises); a no-op outside a job."""
    check = getattr(_local, "check", None)
    if check is not None:
        check()


def cancel_requested() -> bool:
    """Whether this thread's job was cancelled, for work that polls a flag instead of calling
    :func:`checkpoint` (``core.measure.repair.repair(..., cancel=cancel_requested)``); False outside a job."""
    try:
        checkpoint()
    except Cancelled:
        return True
    return False


@contextmanager
def turn() -> Iterator[None]:
    """One step: a checkpoint, then the body inside the job's turn (nested steps share the outer turn)."""
    checkpoint()
    make = getattr(_local, "turn", None)
    if make is None or getattr(_local, "depth", 0) > 0:
        yield
        return
    with make():
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            yield
        finally:
            _local.depth -= 1


def _hook(module: nn.Module, args: object) -> None:
    checkpoint()


def interruptible(model: nn.Module) -> AbstractContextManager:
    """In the body, a :func:`checkpoint` runs before every leaf module's forward of ``model``.

    Only for a model the caller owns (a private copy): the hooks are added to its modules and
    removed afterwards. Outside a job this adds nothing.
    """
    if not in_job():
        return nullcontext()
    return _hooked(model)


@contextmanager
def _hooked(model: nn.Module) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(_hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

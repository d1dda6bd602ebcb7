"""One explorer session's accuracy: the paired estimate, the full test, or without labels the deviation or fidelity.

Every figure is kept per repair level (``"none"``, ``"bn"``, ``"bias"``, ``"reconstruct"``; the old
boolean BN flag is accepted wherever a level is: True is ``"bn"``), so turning a repair off shows the
unrepaired figures again, unchanged. The paired estimates are shared by every session
(:mod:`core.services.estimates`); full-test accuracies, output deviations and fidelities are kept
process-wide in :data:`ACCURACY_CACHE`. Each measurement is one job on the shared compute queue.
"""
from __future__ import annotations

from collections.abc import Callable

from core.common.lru import LRUCache
from core.measure.accuracy import AccuracyReport, evaluate
from core.measure.fidelity import Fidelity, fidelity
from core.measure.latency import output_deviation
from core.measure.paired import PairedEstimate
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult
from core.services import estimates
from core.services.compute_queue import COMPUTE
from core.services.session_context import SessionContext
from core.services.session_repairs import SessionRepairs

#: how far the accuracy refines on its own after a slider move: half-width of the paired 95 % interval
ACCURACY_TARGETS: tuple[float, ...] = (0.05, 0.02, 0.01, 0.005, 0.0)  # 0: every test image
DEFAULT_ACCURACY_TARGET = 0.01
OUTPUT_CHECK_BATCH = 256
FIDELITY_IMAGES = 256  # unlabelled images the fidelity to the dense model is measured on

#: full-test accuracies, output deviations and fidelities, keyed by :meth:`SessionAccuracy.cache_key`
ACCURACY_CACHE = LRUCache(4096)


class SessionAccuracy:
    """The accuracy of one session's settings, at each repair level, on the session's data."""

    def __init__(self, context: SessionContext, repairs: SessionRepairs):
        self._context = context
        self._repairs = repairs

    def cache_key(self, kind: str, config: CompressionConfig | None, level: bool | str, device: str) -> tuple:
        """The :data:`ACCURACY_CACHE` key: (model, data, kind, config or None for dense, repair variant, device)."""
        variant = self._repairs.variant(self._repairs.applied_level(level)) if config is not None else False
        return (self._context.key, self._context.data_key, kind, config, variant, device)

    def evaluation_set(self) -> estimates.EvaluationSet:
        """The labelled images of the paired estimate: the user's (key from their digest), else CIFAR-10's test set."""
        data = self._context.data
        if data is not None and data.labelled:
            return estimates.image_set(data)
        loaded = self._context.loaded
        return estimates.cifar_test_set(tuple(loaded.mean), tuple(loaded.std))

    # -------------------------------------------------------- the paired estimate

    def estimate(self, result: CompressionResult, level: bool | str, device: str) -> PairedEstimate | None:
        """The paired estimate known for this setting and repair level (from any session), without computing."""
        variant = self._repairs.variant(self._repairs.applied_level(level))
        return estimates.current(self._context.key, self.evaluation_set(), result.config, variant, device)

    def refine(self, result: CompressionResult, level: bool | str, device: str,
               poll: Callable[[], object] | None = None) -> PairedEstimate:
        """One queued refinement step of the paired estimate (about ``estimates.BATCH_TARGET_S`` of inference).

        ``level``: the repair level (or the old BN flag); a job level's repair is made first if no
        session has it (better: :meth:`core.services.session_repairs.SessionRepairs.start`, which
        shows progress and can be cancelled). ``poll`` is called while the job waits for its turn
        (see :meth:`core.services.compute_queue.ComputeQueue.job`).
        """
        data = self.evaluation_set()
        level = self._repairs.applied_level(level)
        with COMPUTE.job(poll):
            return estimates.refine(self._context.key, data, result.config, self._repairs.variant(level), device,
                                    self._context.dense_model(device),
                                    lambda: self._repairs.model_on(result, level, device))

    # -------------------------------------------------------- the full test

    def cached_full(self, config: CompressionConfig | None, level: bool | str, device: str) -> AccuracyReport | None:
        """The full-test accuracy of ``config`` (None: dense) at ``level`` if measured, without computing."""
        return ACCURACY_CACHE.get(self.cache_key("full", config, level, device))

    def full(self, result: CompressionResult | None, level: bool | str, device: str) -> AccuracyReport:
        """Accuracy on all 10,000 test images in fp32 at repair level ``level`` (seconds to a minute; queued; cached).

        ``result`` None: the dense model. On the user's labelled images when given.
        """
        config = None if result is None else result.config
        key = self.cache_key("full", config, level, device)
        cached = ACCURACY_CACHE.get(key)
        if cached is not None:
            return cached
        context = self._context
        data = context.labelled_data()
        if data is None:
            raise ValueError("this model has no labelled images here: accuracy cannot be measured")
        with COMPUTE.job():
            model = (context.dense_model(device) if result is None
                     else self._repairs.model_on(result, self._repairs.applied_level(level), device))
            report = evaluate(model, data, device=device)
        ACCURACY_CACHE.put(key, report)
        return report

    def dense_reference(self, device: str) -> tuple[AccuracyReport | None, str]:
        """The dense full-test accuracy if known, and its source: measured here (cached) or the checkpoint's card."""
        measured = self.cached_full(None, False, device)
        default_data = self._context.data is None
        if measured is not None:
            return measured, f"measured here on all {measured.n:,} {'test ' if default_data else ''}images"
        card = self._context.loaded.card if default_data else None
        accuracy = (card or {}).get("test_accuracy")
        if isinstance(accuracy, (int, float)):
            return AccuracyReport(float(accuracy), (), 10_000, 0.0), "from the checkpoint's card (measured when it was trained)"
        return None, ""

    # -------------------------------------------------------- without labels: closeness to the dense model

    def cached_deviation(self, config: CompressionConfig, device: str) -> float | None:
        """The output deviation of ``config`` if measured, without computing."""
        return ACCURACY_CACHE.get(self.cache_key("deviation", config, False, device))

    def deviation(self, result: CompressionResult, device: str) -> float:
        """‖f_c(x) − f(x)‖ / ‖f(x)‖ on fixed Gaussian inputs, for models without labelled data (queued; cached)."""
        key = self.cache_key("deviation", result.config, False, device)
        cached = ACCURACY_CACHE.get(key)
        if cached is None:  # 256 inputs at 32 px; as many pixels in all at larger sizes (at least 8 inputs)
            loaded = self._context.loaded
            batch = OUTPUT_CHECK_BATCH if loaded.input_kind == "vector" else max(
                8, OUTPUT_CHECK_BATCH * 32 * 32 // loaded.image_size ** 2)
            inputs = loaded.example_input(min(OUTPUT_CHECK_BATCH, batch), seed=1).to(device)
            with COMPUTE.job():
                cached = output_deviation(self._context.dense_model(device), result.model.to(device), inputs)
            ACCURACY_CACHE.put(key, cached)
        return cached

    def cached_fidelity(self, config: CompressionConfig, device: str) -> Fidelity | None:
        """The fidelity of ``config`` on the user's images if measured, without computing."""
        return ACCURACY_CACHE.get(self.cache_key("fidelity", config, False, device))

    def fidelity(self, result: CompressionResult, device: str) -> Fidelity:
        """Top-1 agreement and mean KL to the dense model on up to 256 of the user's unlabelled images.

        Queued; cached per model, images, setting and device.
        """
        data = self._context.data
        if data is None:
            raise ValueError("fidelity is measured on your images: give a folder of images first")
        key = self.cache_key("fidelity", result.config, False, device)
        cached = ACCURACY_CACHE.get(key)
        if cached is None:
            with COMPUTE.job():
                cached = fidelity(self._context.dense_model(device), result.model.to(device),
                                  data.images[:FIDELITY_IMAGES], device=device)
            ACCURACY_CACHE.put(key, cached)
        return cached

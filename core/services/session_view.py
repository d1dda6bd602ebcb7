"""What one slider move of an explorer session asks for and gets back: the request, the view and the move."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.measure.accuracy import AccuracyReport
from core.measure.fidelity import Fidelity
from core.measure.latency import LatencyReport
from core.measure.paired import PairedEstimate
from core.measure.repair import RepairResult
from core.measure.realized import RealizedSavings
from core.method.config import CompressionConfig
from core.method.engine import CompressionResult
from core.services.histogram import HIST_BINS, HistogramData
from core.services.repairs import check_level, level_of


@dataclass(frozen=True, kw_only=True)
class ExploreRequest:
    """What the explorer shows for one state of the controls."""

    config: CompressionConfig
    layer: str | None = None
    bins: int = HIST_BINS
    latency_batch: int = 1
    bn_recalibrate: bool = False  # the explorer's old flag: True asks for the "bn" level when ``repair`` is "none"
    repair: str = "none"  # a level of core.services.repairs.LEVELS
    #: whether a job level's repair (minutes on a large model) may run for this setting now; when
    #: False and it is not cached, the figures are for the quick part of the level (BN
    #: recalibration) and the view names the repair as pending (the page runs it on request)
    run_repair: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_level(self.repair)

    @property
    def level(self) -> str:
        """The repair level asked for: ``repair``, or ``"bn"`` from the old flag."""
        return self.repair if self.repair != "none" else level_of(bool(self.bn_recalibrate))


@dataclass(frozen=True, kw_only=True)
class Move:
    """The last change of setting: chunk switches M, T_switch, weights rewritten."""

    switches: int
    t_switch_s: float
    changed: int
    update_s: float
    theta_changed: bool
    before: CompressionConfig | None
    after: CompressionConfig


@dataclass(kw_only=True)
class ExploreView:
    """What the Explore page draws at once for one request: the engine's figures, and heavier ones already known.

    ``latency``, ``estimate``, ``full``, ``deviation`` and ``realized`` are ``None`` until
    measured for this setting (by this session or any other).
    """

    result: CompressionResult
    histogram: HistogramData
    latency: LatencyReport | None
    estimate: PairedEstimate | None
    full: AccuracyReport | None
    full_dense: AccuracyReport | None
    full_dense_source: str
    deviation: float | None
    last_move: Move | None
    last_theta_move: Move | None
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    accuracy_available: bool = False  # the model has labelled data here (CIFAR-10 found and readable, or the user's)
    realized: RealizedSavings | None = None
    fidelity: Fidelity | None = None  # unlabelled user images: agreement and KL to the dense model, when measured
    repair_level: str = "none"  # the repair level the accuracy figures are for (what was asked, if it applies)
    repair: RepairResult | None = None  # the finished repair of this setting at a job level, when known
    repair_estimate_s: float | None = None  # its time estimate, when made
    #: the job level asked for but not run for this setting (``run_repair=False``); ``repair_level`` is then
    #: the quick level the figures are for instead
    repair_pending: str | None = None


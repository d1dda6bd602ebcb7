"""Accuracy repair without retraining: BatchNorm recalibration, bias correction, layer-wise reconstruction.

A pruned (and possibly quantized) model is repaired against the dense model it came from,
on a few hundred unlabelled *training* images, with no gradient step::

    from core.measure.repair import RepairConfig, repair
    fixed = repair(dense, result.model, None, RepairConfig("reconstruct"))   # draws 512 training images
    fixed.model, fixed.seconds, fixed.changed, fixed.errors

The methods, each including the ones before it (``RepairConfig.method``):

* ``"none"``: the pruned model as it is (a copy, bit for bit);
* ``"bn"``: BatchNorm running statistics re-estimated on the calibration images
  (:func:`core.measure.accuracy.bn_recalibrate`, exactly as the app's BN option);
* ``"bias"``: one pass through the network in forward order (:class:`Lockstep`: the dense
  model and the model under repair side by side, on the same calibration images). At every
  BatchNorm the running mean and variance are re-estimated on the activations the repaired
  model really feeds it in eval mode, *after* the corrections upstream (the same estimate as
  ``bn_recalibrate``, which instead propagates batch statistics in train mode and runs
  before any correction); then each pruned layer's per-channel mean output on the
  calibration images is restored to the dense model's. Where a layer's output goes only
  into a BatchNorm (conv without bias → BN, every registry CNN) the correction goes into
  that BN's shift β and the mean restored is the BN output's; otherwise into the layer's own
  bias. β is the exact place: the BN output is ``γ·(z − μ)/σ + β``, so adding ``Δ`` to β moves
  each channel's mean by exactly ``Δ`` whatever γ and σ are (correcting ``running_mean``
  instead divides by γ/σ, ill-posed for γ ≈ 0, and is what the re-estimation overwrites).
  A layer with no bias that feeds no BatchNorm is left alone (its ``errors`` row says so).
  Measured on the shipped ResNet-20: restoring the means on top of ``bn_recalibrate``'s
  statistics *raised* the held-out logit error (the β corrections chase the mismatched
  variances downstream); with the statistics re-estimated in the same pass it lowers it;
* ``"reconstruct"``: layer-wise reconstruction, in the same pass. Each pruned layer's kept
  weights (the mask never changes) are re-solved so that, on the calibration images, its
  output *given the already-repaired model's inputs* matches the *dense model's* output:
  per output channel ``c`` the ridge least-squares problem over the kept columns ``S_c``

      min_w ‖X_S,c · w − y_c‖² + λ‖w‖²,   λ = ridge · mean(diag XᵀX / m)

  on the unfolded (im2col) inputs X, at ``positions`` randomly sampled output positions per
  image (all positions of a linear layer: one row per image, so keep ``n_images`` well above
  a linear layer's kept inputs per output). ``XᵀX`` and ``XᵀY`` are accumulated over batches
  (memory bounded by the layer's Gram matrix) and every channel is solved in float64, in
  batches of channels padded to a common size (Cholesky, one thread per factorisation);
  where that costs more than conjugate gradients for all channels at once (wide layers that
  keep much, e.g. ResNet-18's 4,608-input convs at τ = 0.05), by those instead, started from
  the pruned weights and stopped once a step gains < 10⁻⁴ of the total
  (:mod:`core.measure.repair.iterative`; approximate: 99.9 % of the exact drop in error). A
  layer with a bias solves it too (not penalised). Then the BatchNorm after it is
  re-estimated and the means restored, as in ``"bias"``.
  With a bit-width per weight (``quant``, e.g. from :func:`bit_widths` of a quantized engine
  result), each channel is solved, then quantized column by column at each weight's
  assigned bit-width, the rounding error of every column compensated on the channel's
  columns not yet quantized through the inverse of its (regularised) Gram matrix (GPTQ);
  the scales are the engine's rule (``max|W_c| / q_max(b)`` per output channel and
  bit-width) applied to the solved weights, and :attr:`RepairResult.quantized` holds the
  codes and scales (what a packed file needs).

Guarantees: the inputs (``dense``, ``pruned``, an engine's snapshot, a result's model) are
never modified; the repaired model is a new module; pruned weights stay exactly zero; the
calibration images come from the training split (or the caller); no labels are used.

Cancelling: ``cancel`` (a ``threading.Event`` or a callable returning True) is checked
before every layer, and within a reconstruction before every calibration batch and every
group of channel solves; when set, :class:`RepairCancelled` is raised and nothing is returned
(a half-repaired model is not a consistent one: later layers were never fitted).

Where each part lives (this package's ``__init__`` is the public surface):

* :mod:`core.measure.repair.types`: the methods, :class:`RepairConfig`, :class:`RepairResult`,
  :class:`QuantizedLayer` and the cancel contract (:class:`RepairCancelled`);
* :mod:`core.measure.repair.api`: the entry points :func:`repair` and :func:`repair_setting`,
  their inputs (:func:`masks_from_zeros`, :func:`bit_widths`) and the held-out error table;
* :mod:`core.measure.repair.steps`: the per-layer steps and the lock-step walk over layers;
* :mod:`core.measure.repair.solver`: the shared least-squares solver (Gram matrices, ridge, GPTQ);
* :mod:`core.measure.repair.iterative`: all of a layer's masked systems at once by conjugate gradients;
* :mod:`core.measure.repair.estimate`: the seconds a repair will take, before it starts.
"""
from core.measure.calibration import TraceError
from core.measure.repair.api import ATTENTION_SKIP, bit_widths, layer_errors, levels, masks_from_zeros, repair, repair_setting
from core.measure.repair.estimate import estimate_seconds, estimate_setting_seconds
from core.measure.repair.iterative import SOLVER
from core.measure.repair.types import METHODS, QuantizedLayer, RepairCancelled, RepairConfig, RepairResult

__all__ = [
    # what a repair takes and gives back (core.measure.repair.types)
    "METHODS", "RepairConfig", "RepairResult", "QuantizedLayer", "RepairCancelled", "TraceError",
    # the entry points and their inputs (core.measure.repair.api)
    "repair", "repair_setting", "levels", "bit_widths", "masks_from_zeros", "layer_errors", "ATTENTION_SKIP",
    # the time a repair will take, before it starts (core.measure.repair.estimate)
    "estimate_seconds", "estimate_setting_seconds",
    # which solver fitted a reconstruction (a cache of repaired results keys on it)
    "SOLVER",
]

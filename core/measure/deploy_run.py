"""``python -m core.tune ... --tau T --export onnx``: the ONNX files and the deployment table of one setting.

:func:`deploy_outputs` re-applies the setting ``core.tune`` just evaluated (the engine is
deterministic, and so is the repair for the same images, seed and ridge: the same weights), exports
``model.onnx`` (fp32) and ``model.int8.onnx`` (int8 QDQ with the engine's codes, or the repair's)
and measures :func:`core.measure.deploy_table.measure_deployment` on the evaluation images the
setting was evaluated on. Activations are calibrated on the repair's images when a repair ran,
else on ``CALIBRATION_IMAGES`` unlabelled images (CIFAR-10 *training* images, or the
``--calibration-data`` folder): never on the evaluation images.

``deploy.csv`` has one row per runtime × precision × model × batch (:data:`core.measure.deploy_table.COLUMNS`).
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from core.measure import tuning
from core.measure.accuracy import EvalData
from core.measure.deploy_export import FP32_FILE, INT8_FILE, export_setting
from core.measure.deploy_table import DeployConfig, DeployTable, measure_deployment
from core.measure.repair import RepairConfig, repair_setting

#: unlabelled images the int8 activations are calibrated on when no repair drew images
CALIBRATION_IMAGES = 512
#: the default measurement: every evaluation image the setting was evaluated on
EVERY_IMAGE = DeployConfig(eval_images=None)


def deploy_outputs(outcome, repair: RepairConfig, *, config: DeployConfig = EVERY_IMAGE,
                   progress: Callable[[str], Callable[[int, int, str], None]] | None = None,
                   ) -> tuple[dict[str, bytes | str], DeployTable]:
    """``{"model.onnx", "model.int8.onnx", "deploy.csv"}`` for a :class:`core.measure.tune_runs.SettingOutcome`
    (its model, data, setting) at repair level ``repair.method``; and the measured table.

    ``config.eval_images`` None (the default): every evaluation image the setting was evaluated on.
    The files are exported into a temporary folder and returned as bytes (``core.tune`` writes them
    all at once); the table's ``files`` paths point into that folder, which no longer exists.
    """
    inputs = outcome.inputs
    tuned = inputs.model
    engine = tuning.make_engine(tuned)
    result = engine.apply(outcome.config)
    repaired = None
    if repair.method != "none":
        repaired = repair_setting(tuned.model, engine, result, inputs.repair_images, repair,
                                  on_progress=progress("repair again") if progress else None)
        calibration = inputs.repair_images
    else:
        calibration, _ = tuning.repair_calibration(outcome.spec.calibration_data, tuned, CALIBRATION_IMAGES)
    data = EvalData(inputs.data.images, inputs.data.labels, inputs.data.description)
    with tempfile.TemporaryDirectory(prefix="core-tune-onnx-") as folder:
        files = export_setting(tuned.model, engine, result, folder, calibration, repaired=repaired)
        model = repaired.model if repaired is not None else result.model
        table = measure_deployment(tuned.model, model, files, data, config=config,
                                   on_progress=progress("deploy") if progress else None)
        written = {FP32_FILE: Path(files.fp32).read_bytes(), INT8_FILE: Path(files.int8).read_bytes(),
                   "deploy.csv": table.table.to_csv(index=False)}
    return written, table

"""The Explore table's job (core.services.deploy_jobs): cached for every session, cancellable, export errors kept."""
from __future__ import annotations

import torch

from core.deploy.onnx_export import CalibrationError, ExportConfig
from core.measure.deploy_table import DeployCancelled, DeployConfig
from core.services import deploy_jobs
from tests.deploy.onnx_setting import setting

SMALL = DeployConfig(batches=(2,), eval_images=0, budget_s=0.02, min_rounds=1, max_rounds=2,
                     runtimes=("onnxruntime",))
FAST = ExportConfig(exporter="torchscript")


def test_a_finished_job_is_cached_and_keeps_its_files():
    s = setting()
    work = deploy_jobs.deploy_work(s.dense, s.engine, s.result, s.calibration[:16], None, config=SMALL, export=FAST)
    job = deploy_jobs.submit(("small", "ok"), work, watcher=1)
    assert job.wait(120) and job.error is None, job.error
    table = deploy_jobs.cached(("small", "ok"))
    assert table is job.result and table.files.int8.is_file()
    assert set(table.table.runtime) == {"torch eager", "onnxruntime"}


def test_a_cancelled_job_ends_with_its_cancellation_and_no_files():
    s = setting()
    work = deploy_jobs.deploy_work(s.dense, s.engine, s.result, s.calibration[:16], None, config=SMALL, export=FAST)
    job = deploy_jobs.DeployJob(("small", "cancel"), work)
    job.cancel()
    job.start()
    assert job.wait(120)
    assert job.is_cancellation(job.error) and job.result is None, job.error
    assert isinstance(job.error, DeployCancelled)
    assert deploy_jobs.cached(("small", "cancel")) is None


def test_no_calibration_images_is_the_jobs_error():
    s = setting()
    work = deploy_jobs.deploy_work(s.dense, s.engine, s.result, torch.empty(0, 3, 8, 8), None, config=SMALL, export=FAST)
    job = deploy_jobs.submit(("small", "nocal"), work, watcher=1)
    assert job.wait(60)
    assert isinstance(job.error, CalibrationError) and "calibration images" in str(job.error)

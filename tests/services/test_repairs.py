"""The explorer's repair levels: jobs that a new move or Stop cancels, a cache shared by sessions, no mutation.

The repairs run on the shipped ResNet-20 with few calibration images (64 fitted, 32 held out)
so that each takes a second or two; the behaviour does not depend on the size.
"""
from __future__ import annotations

import hashlib
import json
import threading

import pytest
import torch

import core.services.repairs as repairs
import core.services.session
import core.services.session_repairs as session_repairs
from core.measure.repair import RepairCancelled
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.services.choices import load_choice
from core.services.session import ExploreRequest, ExploreSession
from core.services.uploads import read_settings_repair, settings_json
from core.workloads.models import state_dict_digest

MODEL = "pretrained:resnet20"
SETTING = CompressionConfig(tau=0.2, theta=0.3, b_low=4, b_high=8)
OTHER = CompressionConfig(tau=0.3)


@pytest.fixture(autouse=True)
def small_repairs(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(repairs, "REPAIR_IMAGES", 64)
    monkeypatch.setattr(repairs, "REPAIR_HOLDOUT", 32)
    core.services.session.clear_caches()
    yield
    core.services.session.clear_caches()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded():
    return load_choice(MODEL)


class Paused:
    """Wraps the repair so that it stops after its first layer until ``proceed`` is set."""

    def __init__(self, monkeypatch):
        self.reached, self.proceed = threading.Event(), threading.Event()
        real = session_repairs.run_repair

        def paused(*args, on_progress=None, **kwargs):
            def progress(done, total, layer):
                on_progress(done, total, layer)
                if done == 1:
                    self.reached.set()
                    assert self.proceed.wait(30), "the test never let the repair go on"
            return real(*args, on_progress=progress, **kwargs)

        monkeypatch.setattr(session_repairs, "run_repair", paused)


def snapshot_digest(session: ExploreSession) -> str:
    """SHA256 over the shared snapshot: its template model and every layer's ranked weights and order."""
    snapshot = session.engine.snapshot
    digest = hashlib.sha256(state_dict_digest(snapshot.template).encode())
    for name, layer in snapshot.layers.items():
        digest.update(name.encode())
        digest.update(memoryview(layer.ranked_values().view(torch.uint8).reshape(-1).numpy()))
        digest.update(memoryview(layer.order.contiguous().view(torch.uint8).reshape(-1).numpy()))
    return digest.hexdigest()


def test_levels_and_why_a_level_does_not_apply(loaded):
    session = ExploreSession(loaded)
    assert session.repairs.levels() == ["none", "bn", "bias", "reconstruct"] and session.repairs.unavailable() == {}
    mlp = ExploreSession(load_choice("synthetic:mlp"))  # no labelled data: nothing to show a repair on
    assert mlp.repairs.levels() == ["none"]
    assert "no labelled images" in mlp.repairs.unavailable()["reconstruct"]
    view = mlp.update(ExploreRequest(config=OTHER, repair="reconstruct"))
    assert view.repair_level == "none" and any("does not apply" in note for note in view.notes)
    with pytest.raises(ValueError, match="does not apply"):
        mlp.repairs.start(view.result, "reconstruct")
    with pytest.raises(ValueError, match="repair must be one of"):
        ExploreRequest(config=OTHER, repair="retrain")
    assert ExploreRequest(config=OTHER, bn_recalibrate=True).level == "bn"  # the old flag is the "bn" level


def test_a_cifar_model_on_the_users_images_repairs_on_cifar_training_images_only(loaded, tmp_path):
    from core.workloads.image_folder import read_image_folder
    from tests.services.test_user_models import folder

    session = ExploreSession(loaded)
    session.use_data(read_image_folder(folder(tmp_path, {"cat": 4, "ship": 4}), loaded.input_preprocess()))
    assert session.repairs.levels() == ["none", "bn", "bias", "reconstruct"]  # the training split is there
    calibration = session.repairs.calibration_images()  # BN recalibration's images: training images, not the user's
    assert len(calibration) == session_repairs.CALIBRATION_IMAGES and len(session.data) == 8
    fit, held = repairs.calibration(64, 32, 0, tuple(loaded.mean), tuple(loaded.std))
    assert len(fit) == 64 and len(held) == 32  # what the repairs fit and measure on (CIFAR-10 training split)


def test_a_model_evaluated_only_on_the_users_images_offers_no_repair_and_says_why(tmp_path):
    from core.services.uploads import read_upload
    from core.workloads import torchvision_models as tv
    from core.workloads.image_folder import read_image_folder
    from tests.services.test_user_models import folder, saved

    torch.manual_seed(0)
    weights = saved(tv.build("squeezenet1_1", {"num_classes": 10}).state_dict())
    loaded = read_upload(weights, "sq.pt", "torchvision:squeezenet1_1")  # an ImageNet-sized model: no CIFAR-10
    session = ExploreSession(loaded)
    session.use_data(read_image_folder(folder(tmp_path, {"cat": 4, "ship": 4}), loaded.input_preprocess()))
    assert session.has_labels and session.repairs.levels() == ["none"]
    assert "must not be the images its accuracy is measured on" in session.repairs.unavailable()["reconstruct"]
    with pytest.raises(ValueError, match="does not apply"):
        session.repairs.start(session.apply(OTHER), "bias")


def test_a_new_slider_move_cancels_the_running_repair(loaded, monkeypatch):
    paused = Paused(monkeypatch)
    session = ExploreSession(loaded)
    result = session.update(ExploreRequest(config=SETTING, repair="reconstruct")).result
    job = session.repairs.start(result, "reconstruct")
    assert paused.reached.wait(60) and not job.finished
    session.update(ExploreRequest(config=OTHER, repair="reconstruct"))  # the move
    assert job.cancelled
    paused.proceed.set()
    assert job.wait(60)
    assert isinstance(job.error, RepairCancelled) and job.result is None
    assert job.error.done == 1 and job.error.total == job.total > 1  # stopped before the second layer
    assert session.repairs.cached(SETTING, "reconstruct") is None  # nothing half-done is kept
    assert repairs.running(session.repairs.key(SETTING, "reconstruct")) is None


def test_stop_cancels_and_a_rerun_of_the_same_setting_keeps_it_running(loaded, monkeypatch):
    paused = Paused(monkeypatch)
    session = ExploreSession(loaded)
    request = ExploreRequest(config=SETTING, repair="bias")
    result = session.update(request).result
    job = session.repairs.start(result, "bias")
    assert paused.reached.wait(60)
    session.repairs.leave(job)  # the page was interrupted ...
    session.update(request)  # ... by a rerun for the same setting (another widget): the job goes on
    assert session.repairs.start(result, "bias") is job and not job.cancelled
    session.repairs.stop()  # the Stop button
    assert job.cancelled
    paused.proceed.set()
    assert job.wait(60) and isinstance(job.error, RepairCancelled)


def test_a_job_nobody_watches_is_cancelled_after_the_grace_period(loaded, monkeypatch):
    paused = Paused(monkeypatch)
    monkeypatch.setattr(repairs, "UNWATCHED_GRACE_S", 0.0)
    session = ExploreSession(loaded)
    result = session.apply(SETTING)
    job = session.repairs.start(result, "bias")
    assert paused.reached.wait(60) and not job.cancelled
    session.repairs.leave(job)  # the page went away and never came back
    assert job.cancelled
    paused.proceed.set()
    assert job.wait(60) and isinstance(job.error, RepairCancelled)


def test_repairs_are_shared_across_sessions_and_a_move_in_one_does_not_stop_the_other(loaded, monkeypatch):
    paused = Paused(monkeypatch)
    first, second = ExploreSession(loaded), ExploreSession(loaded)
    request = ExploreRequest(config=SETTING, repair="reconstruct")
    result_1 = first.update(request).result
    result_2 = second.update(request).result
    job = first.repairs.start(result_1, "reconstruct")
    assert second.repairs.start(result_2, "reconstruct") is job  # one job for both
    assert paused.reached.wait(60)
    first.update(ExploreRequest(config=OTHER, repair="reconstruct"))  # the first user moves on
    assert not job.cancelled  # the second still waits for it
    paused.proceed.set()
    assert job.wait(120) and job.error is None
    third = ExploreSession(loaded)  # a new session on the same model and setting: no work
    view = third.update(request)
    assert view.repair is job.result and third.repairs.cached(SETTING, "reconstruct") is job.result
    assert third.repairs.model(view.result, "reconstruct") is job.result.model


def test_repair_is_non_destructive_and_off_gives_the_unrepaired_predictions(loaded):
    session = ExploreSession(loaded)
    model_before = state_dict_digest(loaded.model)
    snapshot_before = snapshot_digest(session)
    result = session.update(ExploreRequest(config=SETTING)).result
    result_before = state_dict_digest(result.model)
    unrepaired = session.accuracy.refine(result, "none", "cpu")
    images = session.accuracy.evaluation_set().batch(0, 64)
    with torch.inference_mode():
        plain = result.model(images).argmax(1)
    repaired = session.repairs.run(result, "reconstruct")
    assert repaired.model is not result.model and repaired.model is not loaded.model
    assert repaired.changed  # it did change the repaired copy ...
    session.accuracy.refine(result, "reconstruct", "cpu")
    # ... and nothing else: the shared model, the snapshot, the session's result
    assert state_dict_digest(loaded.model) == model_before
    assert snapshot_digest(session) == snapshot_before
    assert state_dict_digest(result.model) == result_before
    # off: the same model, the same predictions, the same estimate as before the repair
    off = session.update(ExploreRequest(config=SETTING, repair="none"))
    assert off.repair_level == "none" and off.repair is None
    assert session.repairs.model(result, "none") is result.model
    with torch.inference_mode():
        assert torch.equal(session.repairs.model(result, "none")(images).argmax(1), plain)
        fresh = Engine(load_choice(MODEL).model).apply(SETTING).model  # as if no repair had ever run
        assert torch.equal(fresh(images).argmax(1), plain)
    assert off.estimate.n == unrepaired.n and off.estimate.accuracy == unrepaired.accuracy
    repaired_estimate = session.accuracy.estimate(result, "reconstruct", "cpu")
    assert repaired_estimate is not None and repaired_estimate is not off.estimate  # kept apart


def test_the_bn_level_is_the_old_bn_recalibration(loaded):
    session = ExploreSession(loaded)
    result = session.apply(SETTING)
    assert session.repairs.model(result, "bn") is session.repairs.model(result, True)
    assert session.accuracy.cache_key("full", SETTING, "bn", "cpu") == session.accuracy.cache_key("full", SETTING, True, "cpu")
    assert session.accuracy.cache_key("full", SETTING, "none", "cpu")[4] is False


def test_settings_files_carry_the_level_and_old_ones_map_bn_recalibrated_to_bn(loaded):
    text = settings_json(SETTING, loaded, repair="reconstruct")
    data = json.loads(text)
    assert data["repair"] == "reconstruct" and data["bn_recalibrated"] is True
    assert read_settings_repair(text) == "reconstruct"
    old = settings_json(SETTING, loaded, bn_recalibrated=True)  # as files were written before the levels
    assert "repair" not in json.loads(old) and read_settings_repair(old) == "bn"
    assert read_settings_repair(settings_json(SETTING, loaded)) == "none"
    assert read_settings_repair(json.dumps(SETTING.to_dict())) is None  # a bare config names no level
    with pytest.raises(ValueError, match="repair must be one of"):
        read_settings_repair(json.dumps({**data, "repair": "retrain"}))

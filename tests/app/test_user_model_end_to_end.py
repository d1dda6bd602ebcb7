"""A user's own CIFAR-sized model, tuned end to end through the Tune page and through ``python -m core.tune``.

The user: a torchvision ``resnet18`` with 10 classes at 32 px, trained here for about a minute
(:data:`TRAIN_STEPS` SGD steps on the CIFAR-10 training split, ~45–47 % test accuracy), saved as a
state_dict, and 20 labelled test images per class written as lossless PNG files in
``ImageFolder`` layout (and zipped for the browser's upload). Both paths must report the dense
accuracy that ``core``'s own evaluation gives on the same pixels (the CIFAR-10 tensors,
normalised by :func:`core.workloads.data.normalize`), and the same accuracy at every τ both run.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

import core.tune as tune
from core.deploy.packed_reader import load_compressed
from core.measure.accuracy import EvalData, evaluate
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads import torchvision_models as tv
from core.workloads.data import CIFAR_MEAN, CIFAR_STD, CLASSES, augment, load_cifar10, normalize
from tests.app.tune_tools import run_jobs
from tests.conftest import FULL_TESTS
from ui.errors import unescape

APP = "../../app.py"  # resolved against this file's folder
#: full form (BOUNDARY_FULL_TESTS=1): about two minutes on a 2-core CPU, ~47 % accuracy; small form (CI): about
#: 50 s, ~45 % (measured on the 200 test images below: 45.5 %); every test compares two paths on the same model
TRAIN_STEPS = 450 if FULL_TESTS else 200
PER_CLASS = 20
TAUS = (0.1, 0.2)  # what the page's sweep runs with 3 values up to 0.2
STATS = {"tv_mean": ", ".join(f"{m:.4f}" for m in CIFAR_MEAN), "tv_std": ", ".join(f"{s:.4f}" for s in CIFAR_STD)}


def _train(steps: int) -> torch.nn.Module:
    """torchvision resnet18 (10 classes), ``steps`` of SGD on augmented 128-image CIFAR-10 training batches."""
    train = load_cifar10("train")
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = tv.build("resnet18", {"num_classes": 10}).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(steps):
        index = torch.randint(0, len(train), (128,), generator=generator)
        batch = normalize(augment(train.images[index], generator), CIFAR_MEAN, CIFAR_STD)
        loss = torch.nn.functional.cross_entropy(model(batch), train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The trained model, its state_dict file, the PNG folder and its zip, and core's evaluation data for it."""
    threads = torch.get_num_threads()
    base = tmp_path_factory.mktemp("user_model")
    model = _train(TRAIN_STEPS)
    torch.save(model.state_dict(), base / "weights.pt")
    test = load_cifar10("test")
    index = torch.cat([torch.nonzero(test.labels == c).flatten()[:PER_CLASS] for c in range(len(CLASSES))])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in index.tolist():
            name = Path("val") / CLASSES[int(test.labels[i])] / f"{i:05d}.png"
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(base / name)
            archive.write(base / name, str(name))
    data = EvalData(normalize(test.images[index], CIFAR_MEAN, CIFAR_STD), test.labels[index], "test")
    torch.set_num_threads(threads)
    return {"model": model, "dir": base, "zip": buffer.getvalue(), "data": data}


def accuracy_at(model: torch.nn.Module, tau: float, data: EvalData) -> float:
    """core's own figure: the engine's pruned copy evaluated on core's tensors."""
    if tau == 0:
        return evaluate(model, data).accuracy
    engine = Engine(model, example_input=torch.zeros(1, 3, 32, 32))
    return evaluate(engine.apply(CompressionConfig(tau=tau)).model, data).accuracy


@pytest.fixture(scope="module")
def core_figures(user) -> dict[float, float]:
    return {tau: accuracy_at(user["model"], tau, user["data"]) for tau in (0.0, *TAUS)}


def test_the_trained_model_is_a_real_classifier(core_figures):
    assert core_figures[0.0] > 0.25, "a minute of training should beat chance (10 %) by far"
    assert core_figures[0.2] < core_figures[0.0], "pruning at τ = 0.2 should cost this model accuracy"


def test_the_command_tunes_the_users_model_and_agrees_with_core(user, core_figures, tmp_path, capsys):
    out = tmp_path / "tuned"
    code = tune.main(["--model", "torchvision:resnet18", "--weights", str(user["dir"] / "weights.pt"),
                      "--data", str(user["dir"] / "val"), "--image-size", "32",
                      "--mean", *map(str, CIFAR_MEAN), "--std", *map(str, CIFAR_STD),
                      "--max-drop", "100", "--taus", *map(str, TAUS), "--out", str(out)])
    assert code == 0, capsys.readouterr()
    frame = pd.read_csv(out / "sweep.csv")
    assert (frame["n"] == PER_CLASS * len(CLASSES)).all()
    assert dict(zip(frame["tau"], frame["accuracy"])) == pytest.approx(core_figures, abs=1e-12)
    assert (frame["accuracy_dense"] == frame["accuracy"].iloc[0]).all()
    settings = json.loads((out / "settings.json").read_text())
    assert CompressionConfig.from_dict(settings).tau == max(TAUS)  # 100 points allowed: the largest τ
    assert settings["measured"]["accuracy"] == pytest.approx(core_figures[max(TAUS)], abs=1e-12)
    # the packed file rebuilds the model on its own, and it measures what the settings say
    packed = load_compressed(out / "model.packed")
    assert evaluate(packed, user["data"]).accuracy == pytest.approx(core_figures[max(TAUS)], abs=1e-12)




def test_the_tune_page_tunes_the_users_model_and_agrees_with_core(user, core_figures, fresh_caches):
    at = AppTest.from_file(APP, default_timeout=300)
    state = {"model_key": "torchvision", "tv_arch": "resnet18", "tv_weights": "upload", "tv_image_size": 32,
             **STATS, "pending_torchvision": ("resnet18", (user["dir"] / "weights.pt").read_bytes(), "mine.pt"),
             "data_source": "zip", "data_upload": (user["zip"], "val.zip")}
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page("pages/tune.py").run()
    assert not at.exception and not at.error, [unescape(e.value) for e in at.error]
    assert len(at.session_state["explorer"].data) == PER_CLASS * len(CLASSES)
    at.slider(key="tune_tau_max").set_value(max(TAUS)).run()
    at.slider(key="tune_steps").set_value(len(TAUS) + 1).run()
    run_jobs(at.button(key="tune_run").click().run())
    assert not at.exception and not at.error, [unescape(e.value) for e in at.error]
    frame = at.session_state["tune_user_frame"][1]
    assert dict(zip(frame["tau"], frame["accuracy"])) == pytest.approx(core_figures, abs=1e-12)
    at.number_input(key="tune_points").set_value(100.0).run()
    at.button(key="tune_apply").click().run()
    assert not at.exception and at.session_state["tau"] == max(TAUS)

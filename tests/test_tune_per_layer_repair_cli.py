"""``python -m core.tune --per-layer --repair LEVEL``: refusals, the dispatch, and a small real run that writes the packed file."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import core.measure.tune_per_layer_repair as tplr
from core import tune
from core.deploy.packed_reader import load_compressed
from core.measure.accuracy import predict
from core.measure.allocation_verify import test_images as load_test_images
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.workloads import data as core_data
from core.workloads.models import load_card, load_pretrained
from tests.tune_cli_refusals import assert_refused

needs_data = pytest.mark.skipif(not (core_data.DEFAULT_JPEG_DIR / "SHA256SUMS").is_file(),
                                reason=f"CIFAR-10 JPEG copy not found at {core_data.DEFAULT_JPEG_DIR}")
SMALL = ["--model", "resnet20", "--taus", "0.3", "--images", "50", "--precision", "fp32"]


@pytest.mark.parametrize("argv, words", [
    (["--per-layer", "--repair", "reconstruct", "--target-bytes", "900000", "--out", "x"], "takes --target-retention"),
    (["--per-layer", "--repair", "reconstruct", "--max-drop", "1", "--out", "x"], "takes --target-retention"),
    (["--per-layer", "--repair", "reconstruct", "--target-retention", "0.3", "--out", "x", "--repair-images", "0"],
     "--repair-images"),
    (["--per-layer", "--repair", "bias", "--target-retention", "0.01", "--out", "x", "--taus", "0.05"],
     "below what the τ grid reaches"),
])
def test_refusals(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused(argv, words, capsys)


def test_the_repair_flags_reach_the_search(tmp_path, monkeypatch, capsys):
    seen = {}

    class Fake:
        def __init__(self):
            self.files = {"settings.json": "{}", "model.packed": b"packed"}

        def report(self):
            return "the report"

    def fake(name, config, target, search, **kwargs):
        seen.update(name=name, target=target, search=search, **kwargs)
        return Fake()

    monkeypatch.setattr(tplr, "run_per_layer_repaired", fake)
    out = tmp_path / "out"
    assert tune.main(["--per-layer", "--repair", "bias", "--target-retention", "0.3", "--repair-images", "96",
                      "--repair-seed", "3", "--out", str(out)]) == 0
    assert seen["target"].kind == "retention" and seen["target"].value == 0.3
    assert (seen["search"].repair.method, seen["search"].repair.n_images, seen["search"].repair.seed) == ("bias", 96, 3)
    assert (out / "model.packed").read_bytes() == b"packed" and "the report" in capsys.readouterr().out


@pytest.mark.slow
@needs_data
def test_a_small_run_writes_the_per_layer_tau_the_repair_and_the_repaired_packed_file(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(2)
    small = dataclasses.replace(tplr.SearchConfig(), score_images=100, steps=0)
    monkeypatch.setattr(tplr, "SearchConfig", lambda repair: dataclasses.replace(small, repair=repair))
    out = tmp_path / "run"
    argv = ["--per-layer", *SMALL, "--target-retention", "0.5", "--repair", "reconstruct", "--repair-images", "32",
            "--verify-images", "100", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert tune.main(argv) == 0
    printed = capsys.readouterr().out
    assert "global magnitude" in printed and "uniform τ" in printed and "◀" in printed
    settings = json.loads((out / "settings.json").read_text())
    config = CompressionConfig.from_dict(settings)
    engine = Engine(load_pretrained("resnet20"))
    assert set(dict(config.layer_tau)) == set(engine.layer_names)
    assert engine.apply(config).retention <= 0.5
    assert settings["repair"]["method"] == "reconstruct" and settings["repair"]["n_images"] == 32
    assert settings["search"]["score_images"] == 100
    rows = {row["method"]: row for row in settings["measured"]}
    assert {"dense", "per-layer τ", "uniform τ", "global magnitude"} <= set(rows)
    assert rows["global magnitude"]["kept"] <= rows["per-layer τ"]["kept"] + 20  # same count, up to ties
    model = load_compressed(out / "model.packed")
    pruned = engine.apply(config).model
    for name in engine.layer_names:  # the setting's mask: nonzero only where it keeps a weight
        assert bool(((model.get_submodule(name).weight != 0) <= (pruned.get_submodule(name).weight != 0)).all())
    # the packed file is the chosen setting after its repair: the verified accuracy, image for image
    card = load_card("resnet20")
    data = load_test_images(100, card["mean"], card["std"])
    accuracy = float((predict(model, data.images) == data.labels).float().mean())
    assert accuracy == pytest.approx(rows["per-layer τ"]["accuracy"])
    assert accuracy != pytest.approx(float((predict(pruned, data.images) == data.labels).float().mean())) or \
        settings["repair"]["method"] == "none"

"""core.measure.accuracy: the Wilson interval, balanced subsets, evaluation with known answers, BN recalibration."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.workloads import data as core_data
from core.measure.accuracy import (
    EvalData,
    balanced_subset,
    bn_recalibrate,
    calibration_images,
    eval_data,
    evaluate,
    has_batchnorm,
    predict,
    quick_accuracy,
    wilson_interval,
)
from tests.conftest import same_state, state_fingerprint

needs_data = pytest.mark.skipif(not (core_data.DEFAULT_JPEG_DIR / "SHA256SUMS").is_file(),
                                reason=f"CIFAR-10 JPEG copy not found at {core_data.DEFAULT_JPEG_DIR}")


# ---------------------------------------------------------------- Wilson interval

@pytest.mark.parametrize("correct, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table II, method 3 (Wilson score)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
    # by hand: p = 0.8, z² = 3.8415: centre 0.99208/1.38415, half 1.96·√0.025604/1.38415
    (8, 10, 0.4902, 0.9433),
])
def test_wilson_interval_published_values(correct, n, low, high):
    lo, hi = wilson_interval(correct, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_interval_closed_forms():
    z2 = 1.959963984540054 ** 2
    for n in (1, 10, 1000):
        assert wilson_interval(0, n) == pytest.approx((0.0, z2 / (n + z2)))   # no successes
        assert wilson_interval(n, n) == pytest.approx((n / (n + z2), 1.0))    # all successes
    lo, hi = wilson_interval(500, 1000)
    assert 0.5 - lo == pytest.approx(hi - 0.5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0] > wilson_interval(500, 1000)[1] - lo


# ---------------------------------------------------------------- data with known answers

def known_answer_data(shape=(10, 1, 1)) -> tuple[EvalData, list[float]]:
    """100 inputs; class c has 10, of which the first c are "predicted" correctly, the rest as c+1.

    Each input is the one-hot vector of the class a model that takes argmax of its input
    predicts, so per-class accuracy is c/10 and overall accuracy 45/100.
    """
    labels, predicted = [], []
    for c in range(10):
        for i in range(10):
            labels.append(c)
            predicted.append(c if i < c else (c + 1) % 10)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor(labels)[order]
    predicted = torch.tensor(predicted)[order]
    images = nn.functional.one_hot(predicted, 10).float().view(100, *shape)
    return EvalData(images, labels, "known"), [c / 10 for c in range(10)]


def argmax_conv() -> nn.Module:
    conv = nn.Conv2d(10, 10, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(2 * torch.eye(10).view(10, 10, 1, 1))
    return nn.Sequential(conv, nn.Flatten())


@pytest.mark.parametrize("make_model", [lambda: nn.Flatten(), argmax_conv], ids=["linear-path", "conv-path"])
def test_evaluate_known_answer(make_model):
    data, per_class = known_answer_data()
    model = make_model().train()
    before = state_fingerprint(model)
    report = evaluate(model, data, batch_size=7)
    assert report.accuracy == pytest.approx(0.45)
    assert report.per_class == pytest.approx(tuple(per_class))
    assert report.n == 100 and report.seconds >= 0
    assert model.training and same_state(model, before)  # mode restored, weights untouched
    assert predict(model, data.images, batch_size=33).tolist() == predict(model, data.images, 1000).tolist()


def test_evaluate_missing_class_is_nan():
    data, _ = known_answer_data()
    keep = data.labels != 3
    report = evaluate(nn.Flatten(), EvalData(data.images[keep], data.labels[keep], "no cats"))
    assert report.per_class[3] != report.per_class[3]  # NaN
    assert report.accuracy == pytest.approx((45 - 3) / 90)


def test_quick_accuracy_reports_its_interval():
    data, _ = known_answer_data()
    subset = balanced_subset(data, 5, seed=1)
    estimate = quick_accuracy(nn.Flatten(), subset)
    correct = int((subset.images.flatten(1).argmax(1) == subset.labels).sum())
    assert estimate.n == 50 and estimate.accuracy == correct / 50
    assert (estimate.ci_low, estimate.ci_high) == wilson_interval(correct, 50)
    assert estimate.ci_low <= estimate.accuracy <= estimate.ci_high
    assert estimate.half_width == pytest.approx((estimate.ci_high - estimate.ci_low) / 2)


# ---------------------------------------------------------------- balanced subsets

def uneven_data() -> EvalData:
    """Class c has 5 + c items; each image holds its own index, to trace where picks came from."""
    labels = torch.cat([torch.full((5 + c,), c) for c in range(10)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1)
    return EvalData(images, labels, "uneven")


def test_balanced_subset_counts_and_provenance():
    data = uneven_data()
    subset = balanced_subset(data, 4, seed=0)
    assert torch.bincount(subset.labels, minlength=10).tolist() == [4] * 10
    picked = subset.images.flatten().long()
    assert len(set(picked.tolist())) == 40                  # no image twice
    assert torch.equal(data.labels[picked], subset.labels)  # each image keeps its own label
    assert torch.equal(picked, picked.sort().values)        # original order kept
    assert subset.split == "uneven[4/class]"


def test_balanced_subset_is_deterministic():
    data = uneven_data()
    a, b = balanced_subset(data, 4, seed=0), balanced_subset(data, 4, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(balanced_subset(data, 4, seed=1).images, a.images)
    full = balanced_subset(data, 5, seed=0)  # class 0 has exactly 5: all of them
    assert set(full.images[full.labels == 0].flatten().tolist()) == set(
        torch.nonzero(data.labels == 0).flatten().float().tolist())


def test_balanced_subset_too_few():
    with pytest.raises(ValueError, match="airplane has only 5"):
        balanced_subset(uneven_data(), 6)


# ---------------------------------------------------------------- BatchNorm recalibration

def bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 2 * 2, 10)).eval()
    with torch.no_grad():
        for bn in (model[0], model[2]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model


def test_bn_recalibrate_changes_only_running_stats():
    model = bn_model()
    before = state_fingerprint(model)
    images = torch.randn(100, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 3 + 2
    calibrated = bn_recalibrate(model, images, batch_size=25)
    assert calibrated is not model and same_state(model, before) and not model.training
    assert not calibrated.training
    params = dict(model.named_parameters())
    for name, value in calibrated.named_parameters():
        assert torch.equal(value, params[name]), name  # every weight and bias bit-identical
    first = calibrated[0]
    # cumulative average over 4 equal batches: the mean of batch means and of unbiased batch variances
    batches = images.split(25)
    mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(first.running_mean, mean, atol=1e-5)
    assert torch.allclose(first.running_var, var, atol=1e-4)
    assert not torch.allclose(first.running_mean, model[0].running_mean)
    assert not torch.allclose(calibrated[2].running_var, model[2].running_var)
    assert int(first.num_batches_tracked) == 4
    assert first.momentum == model[0].momentum == 0.1  # momentum restored


def test_bn_recalibrate_without_batchnorm_returns_a_copy():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    assert not has_batchnorm(model) and has_batchnorm(bn_model())
    copy = bn_recalibrate(model, torch.randn(8, 3, 2, 2))
    assert copy is not model and same_state(copy, state_fingerprint(model))


# ---------------------------------------------------------------- the real data

@needs_data
def test_eval_data_is_normalised_and_cached():
    data = eval_data("test")
    assert data.images.shape == (10_000, 3, 32, 32) and data.images.dtype == torch.float32
    per_channel = data.images.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max() < 0.05 and (per_channel.std(1) - 1).abs().max() < 0.05
    assert eval_data("test") is data  # decoded once per process


@pytest.mark.slow
@needs_data
def test_calibration_images_are_fixed_training_images():
    a = calibration_images(300, seed=42)
    assert a.shape == (300, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, calibration_images(300, seed=42))
    assert not torch.equal(a, calibration_images(300, seed=7))
    train = core_data.load_cifar10("train")
    generator = torch.Generator().manual_seed(42)
    index = torch.randperm(len(train), generator=generator)[:300]
    assert len(set(train.labels[index].tolist())) == 10  # class-mixed
    from core.measure.accuracy import CIFAR_MEAN, CIFAR_STD

    # training images with the training augmentation (crop of the padded image, flip)
    augmented = core_data.augment(train.images[index], generator)
    assert torch.equal(a, core_data.normalize(augmented, CIFAR_MEAN, CIFAR_STD))
    assert not torch.equal(a, core_data.normalize(train.images[index], CIFAR_MEAN, CIFAR_STD))

"""The shipped checkpoints: cards complete and true, weights intact, accuracy as stated."""
from __future__ import annotations

import math

import pytest
import torch

from core.measure.accuracy import balanced_subset, eval_data, evaluate
from core.workloads.models import PRETRAINED, build, card_path, count_params, load_card, load_pretrained, sha256_file
from core.common.paths import ASSETS_DIR, CHECKPOINT_DIR
from tests.conftest import FULL_TESTS

REQUIRED_FIELDS = ("arch", "params", "mean", "std", "test_accuracy", "sha256")
TOLERANCE = 0.003  # 0.3 accuracy points


def card_or_skip(name: str) -> dict:
    if not card_path(name).is_file():
        pytest.skip(f"no card for {name!r} at {card_path(name)} yet (train it: python -m core.train {name})")
    return load_card(name)


@pytest.mark.parametrize("name", PRETRAINED)
def test_card_fields(name):
    card = card_or_skip(name)
    missing = [field for field in REQUIRED_FIELDS if field not in card]
    assert not missing, f"{card_path(name)} lacks {missing}"
    assert card["arch"] == name
    weights = CHECKPOINT_DIR / card["file"]
    assert weights.is_file(), f"{weights} named by the card does not exist"
    assert sha256_file(weights) == card["sha256"]
    assert card["params"] == count_params(build(card["arch"], **card.get("arch_kwargs", {})))
    for key in ("mean", "std"):
        assert len(card[key]) == 3 and all(isinstance(v, float) for v in card[key]), key
    assert all(0 < m < 1 for m in card["mean"]) and all(0 < s < 1 for s in card["std"])
    assert 0.1 < card["test_accuracy"] <= 1.0  # a fraction, better than chance


SMALL_PER_CLASS = 200  # the small form: 2,000 class-balanced test images


@pytest.mark.slow
@pytest.mark.parametrize("name", PRETRAINED)
def test_accuracy_matches_card(name):
    """Full form (BOUNDARY_FULL_TESTS=1): all 10,000 test images, within 0.3 points of the card. Small form:
    2,000 class-balanced ones, within 4 standard errors of the card's figure (a wrong checkpoint, normalisation
    or data path costs far more)."""
    card = card_or_skip(name)
    model = load_pretrained(name)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    data = eval_data("test", tuple(card["mean"]), tuple(card["std"]))
    if not FULL_TESTS:
        data = balanced_subset(data, SMALL_PER_CLASS)
    report = evaluate(model, data)
    p = card["test_accuracy"]
    tolerance = TOLERANCE if FULL_TESTS else 4 * math.sqrt(p * (1 - p) / report.n)
    assert report.n == (10_000 if FULL_TESTS else 10 * SMALL_PER_CLASS)
    assert abs(report.accuracy - p) <= tolerance, (
        f"{name}: measured {report.accuracy:.4f} on {report.n:,} test images, card says {p:.4f} (± {tolerance:.4f})")


def test_assets_under_40_mb():
    if not ASSETS_DIR.is_dir():
        pytest.skip(f"{ASSETS_DIR} does not exist yet")
    total = sum(path.stat().st_size for path in ASSETS_DIR.rglob("*") if path.is_file())
    assert total < 40_000_000, f"assets/ holds {total / 1e6:.1f} MB"

import numpy as np
import pytest

from core.services.teaching import OUR_CODE, example_matrix, worked_example


def test_the_worked_example_follows_the_formulas():
    example = worked_example(0.5, 0.6, 2, 4)
    w = example_matrix().numpy()
    top = np.abs(w).max()
    assert example.beta == pytest.approx(0.5 * top, rel=1e-6)
    assert (example.keep == (np.abs(w) >= example.beta)).all()
    assert example.theta == pytest.approx(0.6 * top, rel=1e-6)
    assert set(np.unique(example.chunk)) <= {0, 2, 4}
    assert (example.compressed[~example.keep] == 0).all()
    assert example.retention == pytest.approx(example.keep.mean())


def test_without_theta_every_kept_weight_is_exact():
    example = worked_example(0.2, None)
    assert (example.compressed[example.keep] == example.weights[example.keep]).all()
    assert set(np.unique(example.chunk)) <= {0, 32}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="b_low"):
        worked_example(0.2, 0.3, 8, 4)
    with pytest.raises(ValueError, match="tau"):
        worked_example(1.5, None)


def test_the_shown_code_runs():
    import torch

    scope = {"model": torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))}
    exec(OUR_CODE, scope)  # noqa: S102 (the code the Learn page shows)
    assert scope["result"].retention < 1

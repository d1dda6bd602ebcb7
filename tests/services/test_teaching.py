import numpy as np
import pytest
import torch

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


# ---------------------------------------------------------------- the repair story, read from the benchmark's CSV

def test_the_repair_story_reads_the_measured_figures(tmp_path):
    from core.services.teaching import repair_curves, repair_story, repair_table
    from tests.services.repair_fixture import DENSE, write_repair_csv

    path = write_repair_csv(tmp_path / "repair_resnet18.csv")
    story = repair_story("resnet18", path)
    assert story.tau == 0.2 and story.retention == pytest.approx(0.1123) and story.dense == pytest.approx(DENSE)
    assert story.accuracy == pytest.approx({"none": 0.1, "bn": 0.6543, "bias": 0.7012, "reconstruct": 0.8021})
    assert story.figure("none") == "10.00 %" and story.seconds["reconstruct"] == 42.0
    curves = repair_curves(story)
    assert list(curves["method"].unique()) == ["none", "bn", "bias", "reconstruct"] and len(curves) == 8
    table = repair_table(story)
    assert len(table) == 3 and "+ reconstruction (%)" in table.columns
    assert table.loc[(table["pruning"] == "boundary") & (table["τ"] == 0.2), "pruned, no repair (%)"].item() == 10.0
    # no measured τ = 0.2: the story is told at the largest τ measured
    assert repair_story("resnet18", path, tau=0.5).tau == 0.2


def test_a_missing_file_is_none_and_a_foreign_one_an_error(tmp_path):
    from core.services.teaching import REPAIR_COMMANDS, repair_story

    assert repair_story("resnet18", tmp_path / "absent.csv") is None
    assert REPAIR_COMMANDS["resnet18"] == ("python benchmarks/repair.py --models resnet18 "
                                           "--csv docs/data/repair_resnet18.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="lacks the column"):
        repair_story("resnet18", tmp_path / "other.csv")


@pytest.mark.slow
def test_the_benchmark_writes_what_the_story_reads(tmp_path):
    """A tiny real run of benchmarks/repair.py (ResNet-20, 20 test images): its CSV has the fixture's columns."""
    import importlib.util

    from core.common.paths import REPO_ROOT
    from core.services.teaching import repair_story
    from tests.services.repair_fixture import COLUMNS

    spec = importlib.util.spec_from_file_location("repair_benchmark", REPO_ROOT / "benchmarks" / "repair.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "repair_resnet20.csv"
    threads = torch.get_num_threads()
    try:
        benchmark.main(["--models", "resnet20", "--taus", "0.2", "--methods", "none", "bn", "--baselines", "boundary",
                        "--quant", "--n-images", "32", "--n-holdout", "8", "--test-images", "20", "--threads", "1",
                        "--csv", str(out)])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets the process's thread count
    import pandas as pd

    assert tuple(pd.read_csv(out).columns) == COLUMNS
    story = repair_story("resnet20", out)
    assert story.tau == 0.2 and set(story.accuracy) == {"none", "bn"} and story.dense is not None

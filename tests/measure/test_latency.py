import torch
from torch import nn

from core.measure.latency import measure_latency, output_deviation


def test_dense_and_compressed_are_timed_in_turn_with_memory():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    report = measure_latency(dense, dense, torch.randn(4, 64), min_runs=3, max_runs=5, budget_s=0.0)
    assert report.runs == 3 == len(report.dense_runs_ms) == len(report.compressed_runs_ms)
    assert report.dense_ms > 0 and report.compressed_ms > 0 and report.batch == 4
    assert report.peak_dense_mib > 0 and report.peak_compressed_mib > 0 and "RSS" in report.memory_method


def test_output_deviation_is_relative():
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    assert output_deviation(model, model, x) == 0.0
    half = nn.Linear(3, 2)
    with torch.no_grad():
        half.weight.copy_(model.weight / 2)
        half.bias.copy_(model.bias / 2)
    assert abs(output_deviation(model, half, x) - 0.5) < 1e-5

"""Shared by the kernel and runtime tests."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Correctness tests: one intra-op thread keeps them fast on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return a.shape == b.shape and bool(((a - b).abs() <= 1e-5 * scale).all())


def sparsify(weight: torch.Tensor, sparsity: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        weight[torch.rand(weight.shape, generator=generator) < sparsity] = 0

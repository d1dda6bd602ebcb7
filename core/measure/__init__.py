"""How a result is measured: accuracy, τ sweeps, realized savings and the paper's benchmark suite."""

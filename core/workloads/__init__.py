"""What gets compressed and on what data: the model registry with its checkpoints, and CIFAR-10."""

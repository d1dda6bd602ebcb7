"""Small networks for the channel-pruning tests: residual additions, a concatenation, a depthwise conv, flatten → Linear."""
from __future__ import annotations

import torch
from torch import nn


def spread_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm varied scales and statistics (fresh ones are all alike: nothing would be pruned)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=generator) * 1.5 + 0.05)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model.eval()


class ResMini(nn.Module):
    """Stem, two residual blocks (identity and 1×1 projection shortcut), a concatenation of two branches,
    a depthwise conv, then flatten → Linear: every coupling the rule must respect, on 8×8 inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.a1_bn = nn.BatchNorm2d(8)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.a2_bn = nn.BatchNorm2d(8)
        self.b1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b1_bn = nn.BatchNorm2d(12)
        self.b2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.b2_bn = nn.BatchNorm2d(12)
        self.proj = nn.Conv2d(8, 12, 1, bias=False)
        self.proj_bn = nn.BatchNorm2d(12)
        self.left = nn.Conv2d(12, 6, 1)
        self.right = nn.Conv2d(12, 6, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.dw_bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(x + self.a2_bn(self.a2(torch.relu(self.a1_bn(self.a1(x))))))
        x = torch.relu(self.proj_bn(self.proj(x)) + self.b2_bn(self.b2(torch.relu(self.b1_bn(self.b1(x))))))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = nn.functional.avg_pool2d(x, 2)
        return self.fc(x.flatten(1))


def res_mini(seed: int = 0) -> ResMini:
    torch.manual_seed(seed)
    return spread_bn(ResMini(), seed)

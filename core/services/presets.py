"""Named starting points for the Explore page: a setting and a repair level, each with why it is worth a look.

The first is the page's default: it shows the method working (measured on the shipped
models, 2,000 CIFAR-10 test images, paired: ResNet-20 −0.40 points at 60.5 % retention,
ResNet-18 −0.85 at 40.2 %; ``python -m core.tune --model M --tau 0.1 --theta 0.3 --bits 4 8
--repair bn --images 2000``). The second is the paper's τ, which collapses a trained CNN until
it is repaired; the third prunes as hard and repairs with the reconstruction.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.method.config import CompressionConfig


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A starting point: ``config`` and ``repair`` (a level of :data:`core.services.repairs.LEVELS`)."""

    key: str
    label: str
    description: str
    config: CompressionConfig
    repair: str


_QUANT = {"theta": 0.3, "theta_mode": "relative", "b_low": 4, "b_high": 8}

PRESETS: tuple[Preset, ...] = (
    Preset(key="safe", label="Safe start",
           description="τ = 0.10 with 4/8-bit weights and BN recalibration: 40–60 % of the weights kept, "
                       "accuracy within about a point of dense.",
           config=CompressionConfig(tau=0.10, **_QUANT), repair="bn"),
    Preset(key="paper", label="The paper's τ = 0.2",
           description="The paper's setting, without repair: a trained CNN collapses towards chance. "
                       "Then try the repair.",
           config=CompressionConfig(tau=0.20, **_QUANT), repair="none"),
    Preset(key="aggressive", label="Aggressive + repair",
           description="τ = 0.20 with the reconstruction repair (no retraining): on ResNet-18, 11 % of the "
                       "weights kept within a point of dense.",
           config=CompressionConfig(tau=0.20, **_QUANT), repair="reconstruct"),
)

DEFAULT = PRESETS[0]


def preset(key: str) -> Preset:
    """The preset named ``key``; ``KeyError`` naming the choices otherwise."""
    for found in PRESETS:
        if found.key == key:
            return found
    raise KeyError(f"no preset {key!r}; choose one of {', '.join(p.key for p in PRESETS)}")

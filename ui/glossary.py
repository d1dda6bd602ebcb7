"""One short definition per term the pages use, written for a newcomer; usable as a widget's ``help=`` tooltip.

Plain data (no Streamlit): the pages pass a definition to ``help=``, the Learn page lists them all.

    from ui import glossary
    st.metric("Retention ρ · counted", value, help=glossary.help_for("ρ", "counted"))
    st.slider("τ", 0.0, 1.0, help=glossary.term("tau"))

:data:`TERMS` maps each term, as the pages write it, to its definition (at most two sentences);
:data:`ALIASES` lets code name a Greek letter in ASCII (``"tau"``, ``"beta"`` …).
"""
from __future__ import annotations

#: term (as the pages write it) → its definition, in the order the Learn page lists them
TERMS: dict[str, str] = {
    "τ": "The pruning knob, from 0 to 1: in every layer, weights smaller in magnitude than τ times that layer's "
         "largest weight are set to zero. τ = 0 keeps every weight; larger τ prunes more.",
    "β": "A layer's pruning boundary, β = τ · max|W|: weights with |W| < β become zero, the rest are kept. "
         "Each layer has its own β because each has its own largest weight.",
    "θ": "The precision boundary: a kept weight with |W| ≥ θ takes its value from the high-bit chunk (b_high), a "
         "smaller one from the low-bit chunk (b_low). By default θ is relative, a fraction of each layer's max|W| "
         "like τ.",
    "ρ": "Retention: the share of the prunable (Conv and Linear) weights that are kept, ρ = kept / total. "
         "ρ = 100 % is the dense model; 1 − ρ is roughly the share of multiply-adds that could be skipped.",
    "retention": "The share of the prunable weights that survive pruning (written ρ). "
                 "It is counted exactly, weight by weight, not estimated.",
    "M": "The number of kept weights whose chunk changed (b_low ↔ b_high) at the last move of θ or of the "
         "bit-widths. Moving θ only re-selects between chunks already quantized, so the cost of a move grows with M.",
    "T_switch": "The measured time it took to write those M switched weights. It is a wall-clock time on this "
                "server, so it varies with the machine's load.",
    "counted": "A figure obtained by counting, such as weights kept or bytes held: exact, and the same on every "
               "machine and every run.",
    "computed": "A figure derived by a formula from counted numbers, such as the stored size from the bits each "
                "kept weight needs. It is exact for the format, but not a file measured on disk.",
    "measured": "A figure obtained by running something: timing forward passes, reading memory, or scoring the "
                "model on real test images. It can vary with the machine, its load and the images used.",
    "paired": "The accuracy difference (compressed minus dense) scored on the very same test images, image by "
              "image. Pairing cancels out how hard the chosen images are, so its 95 % interval is much narrower "
              "than that of two separate accuracies.",
    "repair levels": "Ways to win back accuracy after pruning without retraining, each adding to the one before: "
                     "None; BN recalibration (re-estimate BatchNorm statistics on a few hundred training images); "
                     "+ bias correction (restore each layer's mean output); + reconstruction (re-fit the kept "
                     "weights layer by layer to match the dense model). The pruning mask and the bit-widths stay.",
}

#: ASCII or alternative spellings → the key of :data:`TERMS`
ALIASES: dict[str, str] = {
    "tau": "τ", "beta": "β", "theta": "θ", "rho": "ρ", "switches": "M", "t_switch": "T_switch",
    "repair": "repair levels", "repair level": "repair levels",
}


def _key(name: str) -> str:
    if name in TERMS:
        return name
    key = ALIASES.get(name.strip().lower(), name.strip())
    if key not in TERMS:
        raise KeyError(f"{name!r} is not in the glossary (terms: {', '.join(TERMS)})")
    return key


def term(name: str) -> str:
    """The definition of ``name`` (a key of :data:`TERMS` or :data:`ALIASES`); ``KeyError`` for an unknown term."""
    return TERMS[_key(name)]


def help_for(*names: str) -> str:
    """A ``help=`` tooltip for a label that uses several terms: each definition after its term in bold."""
    return "\n\n".join(f"**{_key(n)}**: {term(n)}" for n in names)


def glossary_markdown() -> str:
    """Every term with its definition, as a Markdown list (the Learn page's Glossary section)."""
    return "\n".join(f"- **{key}** — {text}" for key, text in TERMS.items())

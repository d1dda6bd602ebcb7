"""What one more user costs in memory: sessions on one model, measured as process RSS.

    python benchmarks/session_memory.py                      # ResNet-18, 6 sessions
    python benchmarks/session_memory.py --model pretrained:resnet20 --sessions 10

Each session is an :class:`core.services.session.ExploreSession` doing what the Explore
page does on a slider move: apply a setting, split the histogram, and run the compressed
model once (one refinement batch of the accuracy estimate). The resident set size is read
after handing freed heap back to the OS (``gc`` + ``malloc_trim``), so it counts what is held.
Printed: the RSS after the first session (which builds the shared snapshot) and the
increment of each further session, as a multiple of the model's fp32 weights; then the
sessions are dropped one by one, as closed tabs are, and the RSS after each.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.common.memory import process_rss_bytes, release_memory  # noqa: E402
from core.method.config import CompressionConfig  # noqa: E402
from core.services.choices import load_choice  # noqa: E402
from core.services.session import ExploreRequest, ExploreSession  # noqa: E402

MIB = 2 ** 20


def rss() -> int:
    release_memory()
    return process_rss_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pretrained:resnet18")
    parser.add_argument("--sessions", type=int, default=6)
    args = parser.parse_args(argv)
    loaded = load_choice(args.model)
    weights = sum(p.numel() * 4 for n, p in loaded.model.named_parameters() if n.endswith("weight"))
    base = rss()
    print(f"{args.model}: fp32 weights {weights / MIB:.1f} MiB; process with the model loaded {base / MIB:.0f} MiB")
    sessions, previous = [], base
    for i in range(args.sessions):
        session = ExploreSession(loaded)
        view = session.update(ExploreRequest(config=CompressionConfig(tau=0.1 + 0.02 * i, theta=0.3)))
        session.accuracy.refine(view.result, False, "cpu")  # runs the compressed model, as the page does
        sessions.append((session, view))
        now = rss()
        memory = session.measurements.memory()
        what = "first session (builds the shared snapshot)" if i == 0 else f"session {i + 1}"
        print(f"  + {what:44s} RSS {now / MIB:7.0f} MiB, +{(now - previous) / MIB:6.1f} MiB "
              f"= {(now - previous) / weights:4.2f}× the weights; counted: session "
              f"{memory.session / MIB:.1f} MiB, shared {memory.shared / MIB:.1f} MiB")
        previous = now
    del session, view  # only the list holds the sessions now
    print("  dropping the sessions (closed tabs):")
    while sessions:
        sessions.pop()
        now = rss()
        print(f"  - session {len(sessions) + 1:<2d} RSS {now / MIB:7.0f} MiB ({(now - previous) / MIB:+.1f} MiB)")
        previous = now
    print(f"  after every session closed: {previous / MIB:.0f} MiB vs {base / MIB:.0f} MiB with the model loaded "
          f"({100 * (previous / base - 1):+.1f} %); what stays is shared by the next users: the decoded test set, "
          "the dense predictions and the settings' predictions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

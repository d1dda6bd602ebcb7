"""The packed file of a repaired, quantized setting against the fp32 state_dict file (prints; no asserts).

    python benchmarks/repaired_packed_size.py                      # ResNet-18, τ = 0.2, θ = 0.3 relative, 4/8 bit
    python benchmarks/repaired_packed_size.py --model resnet20 --tau 0.2

Repairs the shipped checkpoint's compressed model with layer-wise reconstruction (512 training
images; the bit-widths kept, GPTQ-style), packs it (``compressed_bytes(..., repaired=...)``),
loads the file back and checks it equals the repaired model, then prints the sizes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core.deploy.packed_reader import load_compressed  # noqa: E402
from core.deploy.packed_writer import compressed_bytes, state_dict_file_bytes  # noqa: E402
from core.measure.repair import RepairConfig, repair_setting  # noqa: E402
from core.method.config import CompressionConfig  # noqa: E402
from core.method.engine import Engine  # noqa: E402
from core.workloads.models import load_pretrained  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--tau", type=float, default=0.2)
    parser.add_argument("--theta", type=float, default=0.3)
    parser.add_argument("--bits", type=int, nargs=2, default=[4, 8], metavar=("B_LOW", "B_HIGH"))
    parser.add_argument("--n-images", type=int, default=512)
    args = parser.parse_args(argv)
    model = load_pretrained(args.model)
    engine = Engine(model)
    result = engine.apply(CompressionConfig(tau=args.tau, theta=args.theta, b_low=args.bits[0], b_high=args.bits[1]))
    fixed = repair_setting(model, engine, result, None, RepairConfig("reconstruct", n_images=args.n_images, n_holdout=0))
    plain = compressed_bytes(result, args.model)
    packed = compressed_bytes(result, args.model, repaired=fixed)
    with tempfile.TemporaryDirectory() as folder:
        fp32 = state_dict_file_bytes(model, Path(folder) / "dense.pt")
        path = Path(folder) / "repaired.packed.safetensors"
        path.write_bytes(packed)
        back = load_compressed(path)
    same = all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), fixed.model.state_dict().values()))
    print(f"{args.model} τ={args.tau:g} θ={args.theta:g} {args.bits[0]}/{args.bits[1]} bit, retention "
          f"{100 * result.retention:.2f} %; reconstruction {fixed.seconds:.1f} s")
    print(f"fp32 state_dict file {fp32:,} B; packed {len(plain):,} B; packed with the repair {len(packed):,} B "
          f"= {fp32 / len(packed):.1f}× smaller; loads back equal to the repaired model: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

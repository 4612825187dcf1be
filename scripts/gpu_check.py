"""The prepared GPU check (issue 14): CUDA-marked tests, the speed bench at VGG16 600x1000 in fp32
and bf16 against torchvision, a short default-recipe training and 1-GPU DDP, and torch.compile in
what is left, on one GPU in at most 8 minutes (:mod:`fasterrcnn.bench.gpu_check`).

    python scripts/gpu_check.py                              # on the GPU: outputs/gpu_check/<time>/gpu_check.json
    python scripts/gpu_check.py --copy-to "$OUT"             # and the JSON, the table and a .tar.gz of the run there
    python scripts/gpu_check.py --parts bench_compile        # rerun some parts (after a fix)
    python scripts/gpu_check.py --device cpu --tiny          # the dry run on the CPU, tiny sizes (no GPU figure)

On the lent GPU machine (its python3 has torch, torchvision and lightning, not Hydra), from the
repository root, with outputs/gpu_check/wheels carried (docs/speed.md, "GPU"):

    python3 -m pip install -q --no-index --find-links outputs/gpu_check/wheels hydra-core omegaconf && \\
        PYTHONPATH=src python3 scripts/gpu_check.py --copy-to "$OUT"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without an install too

from fasterrcnn.bench.gpu_check import BUDGET_S, PARTS, check  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the dry run (with --device cpu)")
    p.add_argument("--parts", nargs="+", choices=PARTS, metavar="PART", help=f"run only these, in the check's order ({', '.join(PARTS)})")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check; each part's timeout is at most what is left")
    p.add_argument("--out", type=Path, help="the run folder (default outputs/gpu_check/<time>)")
    p.add_argument("--copy-to", type=Path, help="also write gpu_check.json, gpu_check.txt and gpu_check_run.tar.gz here")
    args = p.parse_args(argv)
    return check(args.out, args.device, args.tiny, args.parts, args.budget, args.copy_to, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, ValueError) as err:
        sys.exit(f"gpu_check.py: {err}")

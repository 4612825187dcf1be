"""Summarise a Hydra multirun (one folder per job): a table, repeats grouped, and a plot.

    python scripts/sweep_report.py outputs/multirun/2025-01-01/12-00-00-000000
    python scripts/sweep_report.py <sweep folder> --out reports/ --metric val/map --use best
    python scripts/sweep_report.py <sweep folder> --repeat-key data.builtin.seed

Jobs that differ only in the repeat key (``seed``: ``python src/train.py -m anchor=k9,k15
seed=0,1,2``) are grouped into configurations: n, mean ± std, the 95% t-interval and whether two
configurations can be told apart with these seeds. Writes report.md (also printed),
report.csv, report_configs.csv (with repeats) and report.png into --out (default: the sweep
folder). The logic lives in fasterrcnn.sweeps.
"""

from __future__ import annotations

import argparse
import os
import sys

from fasterrcnn.sweeps import USES, SweepError, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the multirun folder (hydra.sweep.dir), holding 0/, 1/, ...")
    parser.add_argument("--out", default=None, help="where the report's files go (default: the sweep folder)")
    parser.add_argument("--metric", default="val/map", help="the metric of the table, the statistics and the plot (default: val/map)")
    parser.add_argument("--use", choices=USES, default="final", help="score each job's final validation (default) or its best one (optimistic)")
    parser.add_argument("--repeat-key", default="seed", help="the override whose values are repeats of one configuration (default: seed; '' for none)")
    args = parser.parse_args(argv)
    try:
        text, _ = report(args.sweep, args.out, args.metric, args.use, args.repeat_key)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {os.path.join(args.out or args.sweep, 'report.md')}, its CSV files and report.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

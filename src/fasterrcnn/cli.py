"""What the command lines in ``scripts/`` share: their own ``--options`` first, then Hydra
overrides of ``conf/train.yaml`` (composed with :func:`fasterrcnn.build.compose_config`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def parse_script_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """A script's own ``--options`` and, everything else, Hydra overrides of ``conf/train.yaml``;
    an unknown ``--option`` is an error rather than a silently ignored override."""
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognised option(s): {' '.join(unknown)} (everything else must be a Hydra override key=value)")
    return args, overrides

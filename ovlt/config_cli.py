"""`ovlt config --config FILE [key=value ...]`: print the merged, validated config as YAML."""
from __future__ import annotations

import argparse
import sys

import yaml

from ovlt.config import ConfigError, load_config, to_dict


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ovlt config", description=__doc__)
    ap.add_argument("--config", default=None)
    ap.add_argument("--world-size", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="key.sub=value")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, world_size=args.world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0

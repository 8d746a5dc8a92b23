"""Arguments shared by the loop's own stage programs: `--config CFG --stage STAGE_JSON`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_stage_args(prog: str, argv=None):
    from ovlt.config import load_config
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--config", required=True, help="the stage's config.yaml (written by the loop)")
    ap.add_argument("--stage", required=True, help="the stage's stage.json (inputs / outputs)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    info = json.loads(Path(args.stage).read_text(encoding="utf-8"))
    return cfg, info, Path(args.stage).parent

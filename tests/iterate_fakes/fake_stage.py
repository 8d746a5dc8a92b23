"""A fast stand-in for every stage program of the iterate loop (tests only; imports no torch).

    fake_stage.py STAGE --config CFG [--stage STAGE_JSON]

Writes the outputs the real stage would (paths from the stage JSON or the config's save_dir),
with numbers that are a deterministic function of the round and the stage's config, so a rerun
gives the same manifest. Environment:
  OVLT_FAKE_CALLS   JSONL file: one line per invocation {stage, sid, rank, world}
  OVLT_FAKE_SLEEP   "r1.grpo=30": sleep that long inside that stage (to be killed there)
  OVLT_FAKE_FAIL    "r1.sft": exit 3 in that stage
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import yaml


def main() -> int:
    stage, argv = sys.argv[1], sys.argv[2:]
    cfg_path = Path(argv[argv.index("--config") + 1])
    cfg = yaml.safe_load(cfg_path.read_text())
    sid = cfg_path.parent.name
    rnd = int(sid.split(".")[0][1:])
    info = {}
    if "--stage" in argv:
        info = json.loads(Path(argv[argv.index("--stage") + 1]).read_text())
        assert info["sid"] == sid, (info["sid"], sid)
    rank = int(os.environ.get("RANK", "0"))
    calls = os.environ.get("OVLT_FAKE_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write(json.dumps({"stage": stage, "sid": sid, "rank": rank,
                                "world": int(os.environ.get("WORLD_SIZE", "1")),
                                "token": os.environ.get("OVLT_STAGE_TOKEN")}) + "\n")
    for spec in filter(None, os.environ.get("OVLT_FAKE_SLEEP", "").split(",")):
        name, secs = spec.split("=")
        if name == sid:
            time.sleep(float(secs))
    if os.environ.get("OVLT_FAKE_FAIL") == sid:
        print(f"fake failure in {sid}", file=sys.stderr)
        return 3
    if rank != 0:
        return 0
    # A number that changes with the optimizer settings (e.g. the SFT learning rate), not paths.
    opt = {k: cfg[k]["optimizer"] for k in ("sft", "grpo")}
    salt = int(hashlib.sha256(json.dumps(opt, sort_keys=True).encode()).hexdigest()[:4], 16) / 65536
    out = info.get("outputs", {})
    if stage == "prepare":
        for key in ("pool", "solutions", "heldout"):
            Path(out[key]).parent.mkdir(parents=True, exist_ok=True)
            Path(out[key]).write_text(f"fake {key}\n")
        for key, path in out.items():
            if key.startswith("curriculum."):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(f"fake {key}\n")
        Path(out["base_model"]).mkdir(parents=True, exist_ok=True)
        (Path(out["base_model"]) / "config.json").write_text("{}")
        Path(out["stats"]).write_text(json.dumps({"pool": 40, "heldout": 12}))
    elif stage == "data":
        kept = 10 + rnd
        with open(out["sft"], "w") as f:
            for i in range(kept):
                f.write(json.dumps({"messages": [], "i": i}) + "\n")
        Path(out["stats"]).write_text(json.dumps({"problems": 20, "kept": kept}))
    elif stage in ("sft", "grpo"):
        save = Path(cfg[stage]["train"]["save_dir"])
        (save / "final_hf").mkdir(parents=True, exist_ok=True)
        (save / "final_hf" / "config.json").write_text(json.dumps({"from": cfg["model"]["hf_path"]}))
        with open(save / "metrics.jsonl", "w") as f:
            for step in range(4):
                if stage == "sft":
                    f.write(json.dumps({"step": step, "loss": round(3.0 - 0.5 * step + salt, 6)}) + "\n")
                else:
                    f.write(json.dumps({"step": step, "reward_mean": round(0.1 * rnd + 0.05 * step, 6)}) + "\n")
    elif stage == "eval":
        acc = {"easy": 0.2 + 0.2 * rnd, "medium": 0.1 + 0.1 * rnd, "hard": 0.05 * rnd}
        heldout = {"accuracy": round(sum(acc.values()) / 3, 6), "by_difficulty": acc,
                   "format": min(1.0, 0.3 * rnd), "n": 12}
        if info["inputs"].get("sft_model"):  # rounds > 0: the SFT model on the same split
            heldout["sft_model"] = {"accuracy": 0.25 * rnd, "format": 1.0, "n": 12,
                                    "by_difficulty": {"easy": 0.5 * rnd}}
        Path(out["heldout"]).write_text(json.dumps(heldout))
        if out.get("probe"):  # rounds > 0: the probe of the SFT (before) and GRPO (after) models
            before = {"mean": 0.1 * rnd, "se": 0.02}
            after = {"mean": 0.1 * rnd + 0.1, "se": 0.03}
            Path(out["probe"]).write_text(json.dumps({
                "prompts": 8, "samples_per_prompt": 4, "before": before, "after": after,
                "rise": 0.1, "se_rise": 0.036}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

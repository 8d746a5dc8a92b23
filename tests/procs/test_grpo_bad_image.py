"""GRPO with 1 of 4 prompt images truncated (a valid JPEG header, half the data): that prompt
is a counted, logged skip naming its file and record, the step trains on the other three and
the run finishes (through the launcher, as the iterate loop runs it)."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _jpeg(seed: int) -> bytes:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_truncated_image_is_a_counted_skip(tiny_hf_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths = []
    for i in range(4):
        data = _jpeg(i)
        if i == 2:
            data = data[:len(data) // 2]
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(data)
        paths.append([str(p)])
    rl = tmp_path / "rl.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(4)],
                             "problem": ["<image>How many colours?"] * 4,
                             "answer": [str(i) for i in range(4)], "images": paths}), rl)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "launchers" / "grpo.py"), "--config",
           str(ROOT / "configs" / "grpo" / "tiny_cpu.yaml"), f"model.hf_path={tiny_hf_dir}",
           f"data.rl_files=[{rl}]", f"grpo.train.save_dir={out}", "grpo.train.max_steps=1",
           "grpo.overlong=none", "rollout.max_new_tokens=4", "data.max_pixels=3136",
           "grpo.prompts_per_step=4", "grpo.samples_per_prompt=2",
           "grpo.train.global_batch_size=8", "grpo.train.export_hf=false",
           "grpo.rollout_log_samples=8",
           "grpo.reward_fn=tests.unit.test_grpo_invariants:hash_reward"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    skip_lines = [ln for ln in p.stderr.splitlines() if "skipping prompt" in ln]
    assert len(skip_lines) == 1, p.stderr[-3000:]
    assert f"q2 ({rl}: record 2): unusable image" in skip_lines[0]
    assert str(tmp_path / "img2.jpg") in skip_lines[0]
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["skipped_prompts"] == 1 and rec["step"] == 1
    rolls = [json.loads(ln) for ln in (out / "rollouts.jsonl").read_text().splitlines()]
    assert sorted(r["answer"] for r in rolls) == ["0", "0", "1", "1", "3", "3"]

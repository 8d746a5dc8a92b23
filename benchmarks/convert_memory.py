"""Peak memory of `ovlt convert` (hf2mcore, mcore2hf) vs the checkpoint size (CPU only).

Model: Qwen2.5-VL-7B shapes (vocab 152064 x 3584, untied, 28 heads / 4 KV groups, vision 1280)
with fewer layers (`--layers` LLM layers, `--vision-layers` vision blocks), random bf16 weights,
written as a sharded HF directory. Each conversion runs in a fresh child process that samples
its own /proc/self/status (VmRSS = resident incl. mmapped file pages, RssAnon = heap only)
every 5 ms; the baseline is sampled after imports, before converting.

    python benchmarks/convert_memory.py [--layers 2 --vision-layers 2 --tp 2 --pp 2 --work DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, threading, time
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon"):
            d[k] = int(v.split()[0]) * 1024
    return d
peak = {"VmRSS": 0, "RssAnon": 0}
stop = False
def sample():
    while not stop:
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)
from ovlt.models.qwen2_5_vl.convert_cli import main
base = status()
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.time()
rc = main(sys.argv[1:])
dt = time.time() - t0
stop = True; t.join()
print(json.dumps({"rc": rc, "seconds": dt, "base": base, "peak": peak}))
"""


def make_hf_dir(out: Path, layers: int, vision_layers: int) -> int:
    import torch
    from ovlt.config import CONFIG_ROOT, load_config
    from ovlt.models.qwen2_5_vl import state_dict_adapter as sda
    from ovlt.models.qwen2_5_vl.checkpoint_io import HFCheckpointWriter
    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config

    cfg = load_config(CONFIG_ROOT / "model" / "qwen2_5_vl_7b.yaml").model
    cfg.num_layers, cfg.vision.depth = layers, vision_layers
    cfg.vision.fullatt_block_indexes = [vision_layers - 1]
    w = HFCheckpointWriter(out, max_shard_bytes=1 << 30)
    g = torch.Generator().manual_seed(0)
    for name, shape in sda.hf_shapes(cfg).items():
        w.add(name, torch.randn(shape, generator=g, dtype=torch.bfloat16))
    w.close()
    hf = to_hf_config(cfg)
    hf.dtype = "bfloat16"
    (out / "config.json").write_text(hf.to_json_string())
    return w.total_bytes


def run_child(argv: list[str]) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=ROOT, capture_output=True,
                       text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ovlt_convmem_"))
    try:
        hf, mc, back = work / "hf", work / "mcore", work / "hf_back"
        size = make_hf_dir(hf, args.layers, args.vision_layers)
        res = {"date": time.strftime("%Y-%m-%d"), "device": f"CPU ({platform.processor() or platform.machine()})",
               "model": f"Qwen2.5-VL-7B shapes, {args.layers} LLM + {args.vision_layers} vision layers, bf16",
               "checkpoint_bytes": size, "largest_tensor_bytes": 152064 * 3584 * 2}
        for name, argv in (("hf2mcore", ["hf2mcore", "--hf", str(hf), "--out", str(mc), "--tp",
                                         str(args.tp), "--pp", str(args.pp)]),
                           ("mcore2hf", ["mcore2hf", "--mcore", str(mc), "--out", str(back)])):
            r = run_child(argv)
            res[name] = {"seconds": round(r["seconds"], 2),
                         "peak_rss_anon_over_base_bytes": r["peak"]["RssAnon"] - r["base"]["RssAnon"],
                         "peak_vm_rss_over_base_bytes": r["peak"]["VmRSS"] - r["base"]["VmRSS"],
                         "tp": args.tp, "pp": args.pp}
        out = ROOT / "benchmarks" / "results" / "convert_memory.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

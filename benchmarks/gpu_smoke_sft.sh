#!/usr/bin/env bash
# The real SFT launcher on one GPU with the tiny config in bf16 (NCCL, fused optimizer step,
# CUDA fast paths): train with a mid-run checkpoint, rerun to resume (nothing left to do), load
# the exported HF directory in transformers. Prints one line per check; exits non-zero on a
# failure.   bash benchmarks/gpu_smoke_sft.sh [OUT_DIR]   (CPU dry run: BACKEND=gloo PRECISION=fp32;
# more overrides: EXTRA="model.fp8=scaled_mm_delayed ...")
set -euo pipefail
out=${1:-/tmp/ovlt_gpu_smoke}
rm -rf "$out" && mkdir -p "$out"
python3 -m ovlt data synth --out "$out/synth" --n 48 >/dev/null
args=(--config configs/sft/tiny_cpu.yaml "data.sft_files=[$out/synth/sft.jsonl]"
      "sft.train.save_dir=$out/sft" "parallel.backend=${BACKEND:-nccl}"
      "model.params_dtype=${PRECISION:-bf16}" "sft.train.precision=${PRECISION:-bf16}"
      sft.train.save_interval=2 sft.train.keep_last=2 data.num_workers=2 ${EXTRA:-})
python3 launchers/sft.py "${args[@]}" > "$out/run1.log" 2>&1 || { tail -30 "$out/run1.log"; exit 1; }
echo "run1: $(wc -l < "$out/sft/metrics.jsonl") steps logged; checkpoints: $(ls "$out/sft" | grep -c '^step_')"
grep -ho 'CUDA allocator: .*' "$out/run1.log" "$out/sft/logs/"* 2>/dev/null | head -1 || true
python3 launchers/sft.py "${args[@]}" > "$out/run2.log" 2>&1 || { tail -30 "$out/run2.log"; exit 1; }
echo "run2 (resume): $(grep -c 'loaded checkpoint' "$out/run2.log") checkpoint loaded; metrics rows now $(wc -l < "$out/sft/metrics.jsonl")"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
losses = [r["loss"] for r in rows if "loss" in r]
print(f"loss first {losses[0]:.4f} last {losses[-1]:.4f}; grad_norm last {rows[-1].get('grad_norm')}")
if torch.cuda.is_available():  # the allocator's figures (train.cuda_alloc_conf) reach the log
    print(f"mem_gb last {rows[-1]['mem_gb']}, mem_reserved_gb last {rows[-1]['mem_reserved_gb']}, "
          f"alloc_retries in all {sum(r.get('alloc_retries', 0) for r in rows)}")
m = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "sft" / "final_hf", dtype=torch.bfloat16)
print("final_hf loads in transformers:", sum(p.numel() for p in m.parameters()), "params")
assert losses[-1] < losses[0], "loss did not drop"
PY

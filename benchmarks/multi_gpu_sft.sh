#!/usr/bin/env bash
# The same SFT steps under several layouts on one multi-GPU host (NCCL), or on CPU
# (gloo) for a dry run. Writes one metrics JSONL per layout to $RESULTS, then compares the
# loss curves and throughput with benchmarks/multi_gpu_compare.py.
#   NGPU=2 STEPS=20 bash benchmarks/multi_gpu_sft.sh              # 7B-shaped layers on GPUs
#   NGPU=2 STEPS=3 CONFIG=configs/sft/tiny_cpu.yaml SHAPE= bash benchmarks/multi_gpu_sft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-2}
STEPS=${STEPS:-20}
CONFIG=${CONFIG:-configs/sft/openvlthinker_7b.yaml}
WORK=${WORK:-/tmp/ovlt_multi_gpu}
RESULTS=${RESULTS:-$WORK/results}
LAYOUTS=${LAYOUTS:-"1x1 2x1 1x2"}   # TPxPP; DP = NGPU / (TP*PP)
# 7B-shaped layers that fit one GPU with the optimizer: 4 LLM + 4 vision layers.
SHAPE=${SHAPE-"model.num_layers=4 model.vision.depth=4 model.vision.fullatt_block_indexes=[1,3]"}
PY=${PY:-python}
mkdir -p "$WORK" "$RESULTS"
[ -f "$WORK/synth/sft.jsonl" ] || $PY -m ovlt data synth --out "$WORK/synth" --n 512 --seed 0
# One random-init base model for every layout (mcore's random init differs per PP stage).
if [ ! -f "$WORK/base_hf/config.json" ]; then
  $PY - "$CONFIG" "$WORK/base_hf" $SHAPE <<'PYEOF'
import sys, torch
from ovlt.config import load_config
from ovlt.models.qwen2_5_vl.hf_config import save_tiny_hf_model
cfg = load_config(sys.argv[1], sys.argv[3:])
dtype = torch.bfloat16 if cfg.model.params_dtype == "bf16" else torch.float32
save_tiny_hf_model(sys.argv[2], cfg.model, seed=0, dtype=dtype, max_shard_size="2GB")
PYEOF
fi
for layout in $LAYOUTS; do
  tp=${layout%x*}; pp=${layout#*x}
  rm -rf "$WORK/run_$layout"
  $PY -m torch.distributed.run --standalone --nproc-per-node "$NGPU" launchers/sft.py \
    --config "$CONFIG" $SHAPE model.hf_path="$WORK/base_hf" parallel.tensor_parallel=$tp parallel.pipeline_parallel=$pp \
    data.sft_files=["$WORK/synth/sft.jsonl"] sft.train.max_steps=$STEPS \
    sft.train.global_batch_size=16 sft.train.seed=1 sft.optimizer.warmup_ratio=0.0 \
    sft.optimizer.lr_schedule=constant sft.train.save_interval=0 sft.train.save_final=false \
    sft.train.export_hf=false sft.train.save_dir="$WORK/run_$layout" \
    > "$WORK/log_$layout.txt" 2>&1 || { echo "layout $layout failed"; tail -40 "$WORK/log_$layout.txt"; }
  cp "$WORK/run_$layout/metrics.jsonl" "$RESULTS/metrics_$layout.jsonl" 2>/dev/null || true
done
$PY benchmarks/multi_gpu_compare.py "$RESULTS" --ngpu "$NGPU"

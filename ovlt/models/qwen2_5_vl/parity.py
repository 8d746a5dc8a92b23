"""`ovlt parity --hf DIR [--tp N --pp N] [--images K]`: logits of the mcore model vs HF.

Builds the mcore model from an HF directory (through the state-dict adapter), runs a fixed
batch — images of different sizes spread over samples plus a text-only sample — and prints the
max abs logit difference vs transformers' `Qwen2_5_VLForConditionalGeneration` on the same
inputs (fp32 on CPU by default). Exits 1 above `--tol`. Outside torchrun with tp*pp > 1 it
spawns tp*pp gloo workers itself. The helpers (`make_batch`, `hf_forward`, `mcore_logits`)
are what the tests use.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

# Image grids (t, h, w in patches) used in order; different sizes, several windows each.
GRIDS = [(1, 12, 20), (1, 8, 8), (1, 4, 6), (1, 16, 8)]


def make_batch(model_cfg, images: int = 2, seed: int = 0, text_len: int = 12) -> dict:
    """B=3 equal-length samples: sample 0 gets image 0, sample 1 images 1..K-1, sample 2 is
    text only. Returns input_ids [3,S], attention_mask, pixel_values, image_grid_thw (or None),
    position_ids [3,3,S] (ovlt rope_index)."""
    from ovlt.models.qwen2_5_vl.rope_index import get_rope_index
    g = torch.Generator().manual_seed(seed)
    v = model_cfg.vision
    merge2 = v.spatial_merge_size ** 2
    grids = [GRIDS[i % len(GRIDS)] for i in range(images)]
    per_sample = [grids[:1], grids[1:], []]
    special = min(model_cfg.image_token_id, model_cfg.vision_start_token_id) - 100
    text = lambda n: torch.randint(0, min(special, model_cfg.vocab_size), (n,), generator=g)  # noqa: E731
    seqs = []
    for sample_grids in per_sample:
        parts = [text(text_len)]
        for t, h, w in sample_grids:
            parts += [torch.tensor([model_cfg.vision_start_token_id]),
                      torch.full((t * h * w // merge2,), model_cfg.image_token_id),
                      torch.tensor([model_cfg.vision_end_token_id]), text(3)]
        seqs.append(torch.cat(parts))
    S = max(len(s) for s in seqs)
    seqs = [torch.cat([text(S - len(s)), s]) for s in seqs]  # equal lengths, no padding
    input_ids = torch.stack(seqs)
    grid = torch.tensor(grids, dtype=torch.long) if grids else None
    n_patches = sum(t * h * w for t, h, w in grids)
    in_f = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
    pixel_values = torch.randn(n_patches, in_f, generator=g) if grids else None
    position_ids, _ = get_rope_index(input_ids, grid, spatial_merge_size=v.spatial_merge_size,
                                     image_token_id=model_cfg.image_token_id,
                                     vision_start_token_id=model_cfg.vision_start_token_id)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values=pixel_values, image_grid_thw=grid, position_ids=position_ids)


def load_hf(hf_dir, dtype=torch.float32):
    from transformers import Qwen2_5_VLForConditionalGeneration
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=dtype,
                                                          attn_implementation="eager")
    return m.eval()


def hf_forward(hf_model, batch: dict) -> torch.Tensor:
    """HF logits [B,S,V] (HF computes its own MRoPE positions: an independent reference)."""
    return hf_model_output(hf_model, batch, grad=False).logits.float()


def hf_model_output(hf_model, batch: dict, grad: bool = False, labels=None):
    """HF forward. transformers 5.x builds MRoPE positions only when told which tokens are
    image tokens (`mm_token_type_ids`); without it images would get 1-D text positions."""
    mm = (batch["input_ids"] == hf_model.config.image_token_id).int()
    with torch.set_grad_enabled(grad):
        return hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                        mm_token_type_ids=mm, labels=labels)


def gather_tp_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[.., V/tp] vocab-parallel logits -> full [.., vocab_size] on every TP rank."""
    from megatron.core import parallel_state as ps
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]


def pipeline_forward(model, hidden_shape, dtype, **inputs):
    """Forward-only through all PP stages with plain send/recv (no schedule needed for a
    parity check). Returns the last stage's output there, None elsewhere."""
    from megatron.core import parallel_state as ps
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1 and not ps.is_pipeline_first_stage():
        x = torch.empty(hidden_shape, dtype=dtype, device=inputs["input_ids"].device)
        torch.distributed.recv(x, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(x)
    out = model(**inputs)
    if pp > 1 and not ps.is_pipeline_last_stage():
        torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def mcore_logits(model, batch: dict, model_cfg):
    """Full-vocab logits [B,S,V] on the last PP stage (None on other stages)."""
    B, S = batch["input_ids"].shape
    param = next(model.parameters())
    on = {k: None if batch[k] is None else batch[k].to(param.device)  # a model on the GPU
          for k in ("input_ids", "position_ids", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        out = pipeline_forward(model, (S, B, model_cfg.hidden_size), param.dtype, **on)
    return None if out is None else gather_tp_logits(out.float(), model_cfg.vocab_size)


def build_from_hf(hf_dir, tp: int, pp: int, dtype: str = "fp32"):
    """init_distributed (if needed) + build_model + load HF weights. Returns (model, cfg)."""
    from ovlt.config import ParallelConfig
    from ovlt.distributed import init_distributed
    from ovlt.models.qwen2_5_vl.hf_config import from_hf_config
    from ovlt.models.qwen2_5_vl.provider import build_model, load_hf_weights
    cfg = from_hf_config(hf_dir)
    cfg.params_dtype = dtype
    cfg.transformer_impl = "local"
    init_distributed(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    model = build_model(cfg)
    load_hf_weights(model, hf_dir)
    return model.eval(), cfg


def run(hf_dir, tp: int, pp: int, images: int, seed: int = 0):
    """This rank's part of the check; returns (max_abs_diff, per-sample diffs) on the last
    stage's TP rank 0, else None."""
    from megatron.core import parallel_state as ps
    torch.manual_seed(seed)
    model, cfg = build_from_hf(hf_dir, tp, pp)
    batch = make_batch(cfg, images, seed)
    logits = mcore_logits(model, batch, cfg)
    result = None
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
        ref = hf_forward(load_hf(hf_dir), batch)
        per = (logits - ref).abs().amax(dim=(1, 2))
        result = float(per.max()), [float(x) for x in per]
    # Nobody tears down (rank 0 hosts the TCP store) while the reporting rank still works.
    torch.distributed.barrier()
    return result


def _worker(rank, world, hf_dir, tp, pp, images):
    from ovlt.distributed import destroy_distributed
    try:
        return run(hf_dir, tp, pp, images)
    finally:
        destroy_distributed()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ovlt parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", required=True, help="HF Qwen2.5-VL directory (config.json + safetensors)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--images", type=int, default=2, help="number of images in the batch (0..)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.hf):
        print(f"ovlt parity: --hf {a.hf}: not a directory", file=sys.stderr)
        return 2
    world = a.tp * a.pp
    if "RANK" in os.environ or world == 1:
        res = run(a.hf, a.tp, a.pp, a.images)
        from ovlt.distributed import destroy_distributed
        destroy_distributed()
        results = [res]
    else:
        from ovlt.utils.spawn import run_workers
        results = run_workers(_worker, world, a.hf, a.tp, a.pp, a.images)
    got = [r for r in results if r is not None]
    if not got:
        return 0  # a non-reporting rank under torchrun
    diff, per = got[0]
    print(f"parity tp={a.tp} pp={a.pp} images={a.images}: max_abs_logit_diff={diff:.3e} "
          f"per_sample={[f'{x:.2e}' for x in per]} tol={a.tol:g}")
    return 0 if diff <= a.tol else 1


if __name__ == "__main__":
    raise SystemExit(main())

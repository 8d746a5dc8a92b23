"""MRoPE position ids of Qwen2.5-VL (3 rows: temporal, height, width) for text + images.

Same semantics as HF `Qwen2_5_VLModel.get_rope_index` (transformers 5.x) for images:
- text tokens: one position each, the same on all three rows, counting on from the last;
- an image (a run of `<|image_pad|>` of length t*h*w / merge^2) placed at `p` (the position
  the next text token would have had): row t = p + frame index, row h = p + merged row,
  row w = p + merged column; the text after it continues at p + max(h, w) / merge;
- padded positions (attention_mask == 0) are 0 and are skipped when counting;
- delta[b] = max position + 1 - number of real tokens (what generation adds to 1-D positions).
Videos are not handled (ovlt trains on images; `<|video_pad|>` counts as text here).
"""
from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 151655
VISION_START_TOKEN_ID = 151652


def _image_runs(ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of image tokens in a 1-D tensor."""
    is_img = (ids == image_token_id).to(torch.int8)
    if not bool(is_img.any()):
        return []
    edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends))


def rope_index_1d(ids: torch.Tensor, grids, spatial_merge_size: int = 2,
                  image_token_id: int = IMAGE_TOKEN_ID,
                  vision_start_token_id: int = VISION_START_TOKEN_ID,
                  start: int = 0) -> tuple[torch.Tensor, int]:
    """Positions of ONE unpadded sequence: `ids` [L], `grids` the (t,h,w) of its images in
    order (a [n,3] tensor or list). Returns (positions [3, L] int64, delta). `start` offsets
    all positions (0 for a fresh sample, as packing uses)."""
    ids = ids.reshape(-1)
    runs = _image_runs(ids, image_token_id)
    grids = [] if grids is None else [tuple(int(x) for x in g) for g in grids]
    if len(runs) != len(grids):
        raise ValueError(f"{len(runs)} runs of image tokens ({image_token_id}) but "
                         f"{len(grids)} image grids")
    m = spatial_merge_size
    pieces = []
    pos = start
    prev_end = 0
    for (s, e), (t, h, w) in zip(runs, grids):
        n = t * (h // m) * (w // m)
        if e - s != n:
            raise ValueError(f"image run at token {s} has {e - s} tokens but grid {(t, h, w)} "
                             f"needs {n} (t*h*w/{m}^2)")
        if s == 0 or int(ids[s - 1]) != vision_start_token_id:
            raise ValueError(f"image run at token {s} is not preceded by <|vision_start|> "
                             f"({vision_start_token_id})")
        if s > prev_end:  # text before this image
            pieces.append(torch.arange(pos, pos + s - prev_end).expand(3, -1))
            pos += s - prev_end
        gt, gh, gw = torch.meshgrid(torch.arange(t), torch.arange(h // m), torch.arange(w // m),
                                    indexing="ij")
        pieces.append(torch.stack([gt, gh, gw]).reshape(3, -1) + pos)
        pos += max(h, w) // m
        prev_end = e
    if prev_end < ids.numel():
        pieces.append(torch.arange(pos, pos + ids.numel() - prev_end).expand(3, -1))
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long), 0
    out = torch.cat(pieces, dim=1).long()
    delta = int(out.max()) + 1 - start - ids.numel()
    return out, delta


def get_rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                   attention_mask: torch.Tensor | None = None, spatial_merge_size: int = 2,
                   image_token_id: int = IMAGE_TOKEN_ID,
                   vision_start_token_id: int = VISION_START_TOKEN_ID
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched: `input_ids` [B, S]; `image_grid_thw` [n_images, 3] for the whole batch in
    order (row-major over samples); `attention_mask` [B, S] (1 = real token, any padding
    side). Returns (position_ids [3, B, S] int64, deltas [B, 1] int64)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
    B, S = input_ids.shape
    position_ids = torch.zeros(3, B, S, dtype=torch.long, device=input_ids.device)
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    used = 0
    deltas = []
    for b in range(B):
        ids = input_ids[b].cpu()
        keep = None
        if attention_mask is not None:
            keep = attention_mask[b].cpu().bool()
            ids = ids[keep]
        n_img = len(_image_runs(ids, image_token_id))
        if used + n_img > len(grids):
            raise ValueError(f"sample {b}: needs image {used + n_img} but image_grid_thw has "
                             f"{len(grids)} rows")
        pos, delta = rope_index_1d(ids, grids[used:used + n_img], spatial_merge_size,
                                   image_token_id, vision_start_token_id)
        used += n_img
        pos = pos.to(input_ids.device)
        if keep is None:
            position_ids[:, b] = pos
        else:
            position_ids[:, b, keep.to(input_ids.device)] = pos
        deltas.append(delta)
    if used != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the batch has {used} images")
    return position_ids, torch.tensor(deltas, dtype=torch.long,
                                      device=input_ids.device).unsqueeze(1)


def rope_positions_fn(model_cfg):
    """`fn(ids [L], grids) -> positions [3, L]`: the MRoPE positions of one packed sample for
    `model_cfg` (what the trainer's micro-batches and the built-in engine both use)."""
    def fn(ids: torch.Tensor, grids):
        pos, _ = rope_index_1d(ids, grids, spatial_merge_size=model_cfg.vision.spatial_merge_size,
                               image_token_id=model_cfg.image_token_id,
                               vision_start_token_id=model_cfg.vision_start_token_id)
        return pos
    return fn

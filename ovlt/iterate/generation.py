"""Model loading and prompting shared by the loop's own stage programs (data, eval).

`open_engine(cfg, model_dir)` -> a rollout engine on an HF model directory: the team's
`ovlt.rollout.make_engine` when present, else the built-in engine on an mcore model built with
`provider.build_model` + `load_hf_weights`. `requests_for(records, ...)` turns RL records
(problem text with `<image>`, images) into chat-templated `GenerationRequest`s.
These stages are data-parallel only: each rank generates for its own shard of the problems.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

from ovlt.logging import get_logger

log = get_logger(__name__)


def init_dp(cfg):
    """torch.distributed + mcore parallel_state with TP=PP=CP=1 (generation stages shard by
    problem, every rank holds the whole model)."""
    from ovlt.distributed import init_distributed
    par = copy.deepcopy(cfg.parallel)
    par.tensor_parallel = par.pipeline_parallel = par.context_parallel = 1
    par.sequence_parallel = False
    return init_distributed(par, seed=cfg.data.seed)


def open_engine(cfg, model_dir: str):
    """The configured rollout engine (`ovlt.rollout.make_engine`) on the HF directory
    `model_dir`: vLLM loads it itself; the built-in engine gets an mcore model built here
    (`provider.build_model` + `load_hf_weights`)."""
    import torch
    from ovlt import rollout
    from ovlt.data.tokenizer import load_tokenizer
    c = copy.deepcopy(cfg)
    c.model.hf_path = model_dir
    c.rollout.cuda_graphs = cfg.rollout.cuda_graphs and torch.cuda.is_available()
    tok = load_tokenizer()
    if cfg.rollout.engine in ("auto", "vllm") and rollout.vllm_available():
        return rollout.make_engine(c, tokenizer=tok)
    from ovlt.models.qwen2_5_vl.provider import build_model, load_hf_weights
    model = build_model(c.model)
    load_hf_weights(model, model_dir)
    model.eval()
    return rollout.make_engine(c, model=model, tokenizer=tok)  # images: model.vision_model


def load_images(srcs: Sequence) -> list:
    from ovlt.data.image_loader import open_image
    return [open_image(s) for s in srcs]


def make_request(text: str, images: list, cfg, request_id: Optional[str] = None):
    """One chat-templated prompt (text contains one `<image>` per image, or images go first)."""
    import torch
    from ovlt.data.chat_template import encode_prompt
    from ovlt.data.image_processing import preprocess
    from ovlt.rollout.base import GenerationRequest
    pvs, grids = [], []
    for img in images:
        pv, thw = preprocess(img, cfg.data.min_pixels, cfg.data.max_pixels)
        pvs.append(torch.as_tensor(pv))
        grids.append(tuple(int(x) for x in thw))
    ids = encode_prompt(text, grids)
    return GenerationRequest(prompt_ids=list(ids),
                             pixel_values=torch.cat(pvs) if pvs else None,
                             image_grid_thw=torch.tensor(grids, dtype=torch.long) if grids else None,
                             images=images, prompt_text=text, request_id=request_id)


def generate_texts(engine, requests: list, n: int, temperature: float, top_p: float,
                   max_new_tokens: int, seed: int, batch_size: int = 16) -> list[list[str]]:
    """The `n` sampled texts of each request, `batch_size` requests per engine call. A request
    without a seed gets `derived_seed(seed, its index in requests)`: the samples do not depend
    on the batch size (an engine derives missing seeds from the index inside its call, which
    gave the first request of every batch the same random stream)."""
    import dataclasses

    from ovlt.rollout.base import SamplingParams, derived_seed
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            n=n, seed=seed, logprobs=False)
    requests = [r if r.seed is not None else dataclasses.replace(r, seed=derived_seed(seed, i))
                for i, r in enumerate(requests)]
    out: list[list[str]] = []
    for s in range(0, len(requests), batch_size):
        out += [[c.text for c in comps] for comps in engine.generate(requests[s:s + batch_size], params)]
    return out


def shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]

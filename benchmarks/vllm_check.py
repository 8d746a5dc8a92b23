"""One-shot check of the vLLM rollout engine (vLLM 0.26) against ovlt on one GPU.

    python benchmarks/vllm_check.py --out benchmarks/results/vllm_check_h100.json
    python benchmarks/vllm_check.py --cpu-smoke --out /tmp/vllm_check_smoke.json   # no GPU/vLLM

Stages (each one runs in try/except; the exception text and traceback go into the JSON and the
run continues; the JSON is rewritten after every stage, so a timeout keeps what finished):
  env          versions, GPU, which optional packages are importable (find_spec, no import)
  vllm_import  `from vllm import LLM, SamplingParams` (time, version)
  build        the "trainer": ovlt's mcore Qwen2.5-VL with the 7B shape, `--layers` LLM layers
               (default 28 = the full 7B LLM) and a `--vision-depth`-block vision tower of the real
               width, bf16, random init with non-zero biases / non-unit norms (a mis-routed tensor
               shows), and the final norm scaled so the logits have std `--logit-std` (peaked:
               greedy decoding has margins, log-probs are not all ~-ln V); plus the HF directory
               vLLM needs (config.json, generation_config.json, tokenizer files,
               preprocessor_config.json; no weights)
  hf_dir       transformers loads that directory (config, tokenizer, processor), as vLLM will
  prompts      8 chat prompts (text) + 1 with a synthetic image, ovlt's chat template
  builtin_greedy  ovlt's BuiltinEngine (shares the trainer's weights): greedy, `--greedy-new` tokens
  vllm_engine  VLLMEngine (dummy weights, sleep mode, colocated); `--vllm-mode` graphs = CUDA
               graphs of the decode without torch.compile (fast start), compile = vLLM's default
               (torch.compile + graphs), eager; a failed start is retried in eager mode
  update       VLLMEngine.update_weights(iter_hf_weights(trainer state dict)) x `--update-reps`
               (median), plus a checksum of every vLLM parameter vs the stream (exactness)
  vllm_greedy  the same prompts; token agreement with the built-in engine, first divergences
  logprobs     the trainer's recomputation (packed forward, fp32 log-softmax of the fp32 LM-head
               product) of both engines' completions: max |diff| of their log-probs, and at
               each divergence the trainer's logit margin between the two engines' tokens
  throughput   `--batch` prompts x `--prompt-len` random tokens, `--new` tokens, T=1 top-p 0.99,
               EOS off: tokens/s of vLLM and of the built-in engine (CUDA graphs); HF generate
               with `--hf-baseline`
  sleep_wake   GPU memory freed by sleep() and taken back by wake()+update+generate, and the
               greedy output after the cycle equals the one before
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

T0 = time.perf_counter()
GiB = float(1 << 30)
OPTIONAL_PKGS = [  # import names; presence only
    "vllm", "transformers", "torchvision", "triton", "flash_attn", "flashinfer", "cv2", "numba",
    "llvmlite", "cutlass", "quack", "tilelang", "tokenspeed_mla", "torchcodec", "PyNvVideoCodec",
    "anthropic", "mcp", "opentelemetry", "openai", "openai_harmony", "fastapi", "blake3",
    "xgrammar", "llguidance", "msgspec", "zmq", "cbor2", "pybase64", "partial_json_parser",
    "prometheus_client", "cpuinfo", "einops", "uvloop", "aiohttp", "cachetools", "psutil",
    "numpy", "PIL", "safetensors", "tokenizers", "huggingface_hub", "pydantic", "setproctitle",
    "xxhash", "megatron", "transformer_engine"]


def log(msg: str) -> None:
    print(f"[vllm_check +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def mem() -> dict:
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"free_gib": round(free / GiB, 3), "total_gib": round(total / GiB, 3),
            "torch_allocated_gib": round(torch.cuda.memory_allocated() / GiB, 3)}


from _bench_util import wall_time as timed  # noqa: E402


class Run:
    def __init__(self, args):
        self.args = args
        self.res = {"args": vars(args), "stages": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.S = argparse.Namespace()

    def save(self):
        p = Path(self.args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        os.replace(tmp, p)

    def stage(self, name, fn, needs=()):
        missing = [n for n in needs if not self.res["stages"].get(n, {}).get("ok")]
        if missing:
            self.res["stages"][name] = {"ok": False, "skipped": f"needs {missing}"}
            log(f"SKIP {name}: needs {missing}")
            self.save()
            return None
        left = self.args.budget_s - (time.perf_counter() - T0)
        if left < 5:
            self.res["stages"][name] = {"ok": False, "skipped": f"time budget ({self.args.budget_s}s) spent"}
            log(f"SKIP {name}: time budget spent")
            self.save()
            return None
        log(f"START {name} {mem()}")
        t = time.perf_counter()
        rec = {"ok": False}
        try:
            out = fn(self.S, self.args)
            rec.update(ok=True, result=out)
        except BaseException as e:  # noqa: BLE001 - record everything, keep going
            if isinstance(e, KeyboardInterrupt):
                raise
            rec.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            log(f"FAIL {name}: {type(e).__name__}: {e}")
            print(traceback.format_exc(), flush=True)
        rec["seconds"] = round(time.perf_counter() - t, 3)
        rec["mem_after"] = mem()
        self.res["stages"][name] = rec
        self.save()
        if rec["ok"]:
            log(f"DONE {name} in {rec['seconds']:.1f}s: {_short(rec.get('result'))}")
        return rec.get("result")


def _short(x, n=600):
    s = json.dumps(x, default=str)
    return s if len(s) <= n else s[:n] + "..."


# =========================================================================== stages
def st_env(S, a):
    import importlib.util
    import platform
    d = {"python": platform.python_version(), "torch": torch.__version__,
         "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
         "packages": {}}
    for name in OPTIONAL_PKGS:
        try:
            d["packages"][name] = importlib.util.find_spec(name) is not None
        except Exception as e:  # noqa: BLE001
            d["packages"][name] = f"find_spec error: {e}"
    import transformers
    d["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        d["device"] = torch.cuda.get_device_name()
        d["capability"] = list(torch.cuda.get_device_capability())
        d["mem"] = mem()
    d["env"] = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "CUDA_", "HF_", "NCCL_"))}
    if not a.cpu_smoke:  # before vLLM is imported (VLLMEngine does the same)
        from ovlt.rollout.vllm_engine import optional_package_fallbacks
        d["env_fallbacks_set"] = optional_package_fallbacks()
    if a.v1_runner:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return d


def st_vllm_import(S, a):
    t = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams  # noqa: F401
    return {"version": vllm.__version__, "import_seconds": round(time.perf_counter() - t, 2),
            "file": vllm.__file__}


def _model_cfg(a):
    from ovlt.config import CONFIG_ROOT, load_config
    if a.cpu_smoke:
        m = load_config(CONFIG_ROOT / "model" / "tiny.yaml").model
        m.params_dtype = "fp32"
        m.tie_word_embeddings = False  # exercise lm_head like the 7B
        return m
    m = load_config(CONFIG_ROOT / "model" / "qwen2_5_vl_7b.yaml").model
    m.num_layers = a.layers
    m.vision.depth = a.vision_depth
    m.vision.fullatt_block_indexes = [a.vision_depth - 1]
    m.params_dtype = a.dtype
    m.transformer_impl = "local"
    return m


def _job_cfg(a, mcfg, hf_dir):
    from ovlt.config import JobConfig
    cfg = JobConfig()
    cfg.model = mcfg
    cfg.model.hf_path = str(hf_dir)
    rc = cfg.rollout
    rc.engine = "vllm"
    rc.temperature = 1.0          # raw_logprobs: the contract at T=1 and for greedy
    rc.top_p = 0.99
    rc.max_prompt_length = max(1024, a.prompt_len + 64)
    rc.max_new_tokens = max(a.new, a.greedy_new)
    rc.tensor_parallel = 1
    rc.gpu_memory_utilization = a.gpu_mem_util
    rc.cuda_graphs = a.vllm_mode != "eager"
    return cfg


def _rope_fn(mcfg):
    from ovlt.models.qwen2_5_vl.rope_index import rope_positions_fn
    return rope_positions_fn(mcfg)


def write_hf_dir(mcfg, out: Path, min_pixels: int, max_pixels: int) -> list[str]:
    """config.json + generation_config.json + tokenizer + preprocessor_config.json (no weights:
    vLLM's dummy load never reads them)."""
    from ovlt.data.image_processing import CLIP_MEAN, CLIP_STD
    from ovlt.data.tokenizer import ENDOFTEXT_ID, IM_END_ID, save_hf_tokenizer
    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    out.mkdir(parents=True, exist_ok=True)
    hc = to_hf_config(mcfg)
    d = hc.to_dict()
    d["dtype"] = d["torch_dtype"] = "bfloat16" if mcfg.params_dtype == "bf16" else "float32"
    (out / "config.json").write_text(json.dumps(d, indent=1, default=str))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
         "pad_token_id": ENDOFTEXT_ID}, indent=1))
    save_hf_tokenizer(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "resample": 3,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"},
        indent=1))
    return sorted(p.name for p in out.iterdir())


@torch.no_grad()
def _logits_std(S, ids: list[int]) -> float:
    dev = S.device
    x = torch.as_tensor(ids, dtype=torch.long)
    pos = S.rope_fn(x, None)[:, None].to(dev)
    out = S.model(input_ids=x[None].to(dev), position_ids=pos)
    last = out[0, -1].float()
    return float(last.std())


def st_build(S, a):
    from ovlt.config import JobConfig, ParallelConfig
    from ovlt.distributed import init_distributed
    from ovlt.models.qwen2_5_vl.provider import build_model
    info = init_distributed(ParallelConfig())
    S.device = info.device
    S.mcfg = mcfg = _model_cfg(a)
    torch.manual_seed(a.seed)
    t = time.perf_counter()
    S.model = model = build_model(mcfg).eval()
    built = time.perf_counter() - t
    g = torch.Generator(device=S.device).manual_seed(a.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if "norm" in name:
                    p.copy_(torch.empty_like(p).uniform_(0.8, 1.2, generator=g))
                else:  # biases: non-zero, so a mis-routed one changes outputs
                    p.copy_(torch.empty_like(p).normal_(0.0, 0.02, generator=g))
    S.rope_fn = _rope_fn(mcfg)
    from ovlt.data.tokenizer import load_tokenizer
    S.tok = load_tokenizer()
    probe = S.tok.encode("<|im_start|>user\nWhat is 17 times 23?<|im_end|>\n<|im_start|>assistant\n")
    std0 = _logits_std(S, probe)
    fin = [p for n, p in model.named_parameters() if n.endswith("decoder.final_layernorm.weight")]
    if len(fin) != 1:
        raise RuntimeError(f"final norm not found ({len(fin)} matches)")
    with torch.no_grad():
        fin[0].mul_(a.logit_std / max(std0, 1e-6))
    std1 = _logits_std(S, probe)
    job = JobConfig()
    S.min_pixels, S.max_pixels = job.data.min_pixels, job.data.max_pixels
    S.hf_dir = Path(a.work_dir or tempfile.mkdtemp(prefix="ovlt_vllm_check_")) / "hf"
    files = write_hf_dir(mcfg, S.hf_dir, S.min_pixels, S.max_pixels)
    S.cfg = _job_cfg(a, mcfg, S.hf_dir)
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "build_seconds": round(built, 2), "layers": mcfg.num_layers,
            "vision_depth": mcfg.vision.depth, "dtype": mcfg.params_dtype,
            "logit_std_before": std0, "logit_std_after": std1, "hf_dir": str(S.hf_dir),
            "hf_files": files}


def st_hf_dir(S, a):
    """What vLLM loads from the directory: config, tokenizer, and the Qwen2.5-VL processor
    (vLLM builds it with `use_fast=True`; in transformers 5 it includes a video processor that
    requires torchvision)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    c = AutoConfig.from_pretrained(S.hf_dir)
    tok = AutoTokenizer.from_pretrained(S.hf_dir)
    ids = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    ours = S.tok.encode("<|im_start|>user\nhi<|im_end|>")
    out = {"config": type(c).__name__, "tokenizer": type(tok).__name__,
           "tokenizer_matches_ovlt": ids == ours, "eos": tok.eos_token}
    ip = AutoImageProcessor.from_pretrained(S.hf_dir)
    out["image_processor"] = type(ip).__name__
    try:
        proc = AutoProcessor.from_pretrained(S.hf_dir, use_fast=True)
        out["processor"] = type(proc).__name__
        out["processor_image_processor"] = type(getattr(proc, "image_processor", None)).__name__
    except Exception as e:  # noqa: BLE001
        out["processor_error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        if "orchvision" in str(e):
            out["torchvision_required"] = True
        if not a.cpu_smoke:
            raise
    return out


def st_prompts(S, a):
    import numpy as np
    from PIL import Image

    from ovlt.data.chat_template import encode_prompt
    from ovlt.data.image_processing import preprocess, resize_rgb
    from ovlt.rollout.base import GenerationRequest
    texts = ["What is 17 times 23? Show your steps.",
             "Solve for x: 3x + 7 = 25.",
             "A triangle has sides 3, 4 and 5. What is its area?",
             "List the prime numbers below 30.",
             "If a train travels 120 km in 1.5 hours, what is its average speed?",
             "Simplify (x^2 - 9)/(x - 3).",
             "What is the derivative of sin(x) * x^2?",
             "How many ways can 5 books be arranged on a shelf?"]
    reqs = [GenerationRequest(prompt_ids=encode_prompt(t, tokenizer=S.tok), request_id=f"text{i}",
                              prompt_text=t) for i, t in enumerate(texts)]
    rng = np.random.default_rng(a.seed)
    yy, xx = np.mgrid[0:a.image_size, 0:a.image_size]
    arr = np.stack([(xx * 255 // a.image_size), (yy * 255 // a.image_size),
                    rng.integers(0, 256, (a.image_size, a.image_size))], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    resized = Image.fromarray(resize_rgb(img, S.min_pixels, S.max_pixels))
    pv, grid = preprocess(img, S.min_pixels, S.max_pixels)
    ids = encode_prompt("<image>What is shown in this image? Describe the colours.", [grid],
                        tokenizer=S.tok)
    reqs.append(GenerationRequest(prompt_ids=ids, pixel_values=pv,
                                  image_grid_thw=torch.tensor([grid]), images=[resized],
                                  request_id="image0"))
    S.reqs = reqs
    return {"n_text": len(texts), "n_image": 1, "prompt_lens": [len(r.prompt_ids) for r in reqs],
            "image_grid": list(grid), "image_tokens": int(np.prod(grid)) // 4,
            "image_size_resized": list(resized.size)}


def st_processor_parity(S, a):
    """The pixels vLLM's processor (HF, use_fast=True as vLLM asks) makes of the image prompt's
    (already resized) image vs ovlt's own preprocessing."""
    from transformers import AutoImageProcessor
    req = S.reqs[-1]
    out = {}
    for fast in (True, False):
        try:
            ip = AutoImageProcessor.from_pretrained(S.hf_dir, use_fast=fast)
            bf = ip(images=req.images, return_tensors="pt")
            pv, grid = bf["pixel_values"].float(), bf["image_grid_thw"]
            out["fast" if fast else "slow"] = {
                "class": type(ip).__name__, "grid": grid.tolist(),
                "grid_matches": grid.tolist() == req.image_grid_thw.tolist(),
                "max_abs_pixel_diff": float((pv - req.pixel_values.float()).abs().max())
                if pv.shape == req.pixel_values.shape else f"shape {tuple(pv.shape)}"}
        except Exception as e:  # noqa: BLE001
            out["fast" if fast else "slow"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out


def _comps_summary(outs):
    return [{"id": cs[0].request_id, "n": len(cs[0].token_ids), "finish": cs[0].finish_reason,
             "text": cs[0].text[:80]} for cs in outs]


def st_builtin_greedy(S, a):
    from ovlt.rollout.base import SamplingParams
    from ovlt.rollout.builtin import BuiltinEngine
    eng = BuiltinEngine(S.model, S.mcfg, tokenizer=S.tok, eos_token_ids=[], max_batch_size=64,
                        cuda_graphs=torch.cuda.is_available())
    sp = SamplingParams(temperature=0.0, max_new_tokens=a.greedy_new, logprobs=True)
    dt, outs = timed(lambda: eng.generate(S.reqs, sp))
    S.builtin_greedy = outs
    eng.sleep()
    eng = None  # freed: the closures above read it
    return {"seconds": round(dt, 3), "completions": _comps_summary(outs)}


VLLM_MODES = {
    "eager": {"enforce_eager": True},
    # CUDA graphs of the (uniform) decode batches, no torch.compile: starts in seconds
    "graphs": {"enforce_eager": False,
               "compilation_config": {"mode": "NONE", "cudagraph_mode": "FULL_DECODE_ONLY",
                                      "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128]}},
    "compile": {"enforce_eager": False},  # vLLM's default: torch.compile + piecewise/full graphs
}


def _vllm_cleanup():
    """Undo a half-started engine (vLLM's own groups only: destroy_distributed_environment
    would also destroy the default process group the trainer made)."""
    try:
        from vllm.distributed import parallel_state as vps
        vps.destroy_model_parallel()
        if getattr(vps, "_WORLD", None) is not None:  # its own subgroups, not the default group
            try:
                vps._WORLD.destroy()
            finally:
                vps._WORLD = None
    except Exception as e:  # noqa: BLE001
        log(f"cleanup: {e}")
    gc.collect()
    torch.cuda.empty_cache()


def st_vllm_engine(S, a):
    """Start VLLMEngine the way GRPO does (torch.distributed already initialised by the trainer;
    vLLM reuses that world group). A failed start is retried in eager mode, then in eager mode
    with the trainer's process groups torn down first (re-made on vLLM's afterwards)."""
    from ovlt.rollout.vllm_engine import VLLMEngine
    attempts = [(a.vllm_mode, "shared_dist")]
    if a.vllm_mode != "eager":
        attempts.append(("eager", "shared_dist"))
    attempts.append(("eager", "fresh_dist"))
    tried = []
    for mode, dist_mode in attempts:
        extra = dict(VLLM_MODES[mode], max_num_seqs=max(128, a.batch))
        if a.dtype == "fp32":  # exact-parity mode: vLLM in fp32 as well (picks its backend)
            extra["dtype"] = "float32"
        t = time.perf_counter()
        try:
            if dist_mode == "fresh_dist":
                from ovlt.distributed import destroy_distributed
                destroy_distributed()
            S.cfg.rollout.cuda_graphs = mode != "eager"
            S.engine = VLLMEngine(S.cfg, tokenizer=S.tok, hf_dir=str(S.hf_dir), load_format="dummy",
                                  eos_token_ids=[], extra_llm_kwargs=extra)
            if dist_mode == "fresh_dist":  # mcore's groups again, on vLLM's default group
                from ovlt.config import ParallelConfig
                from ovlt.distributed import init_distributed
                init_distributed(ParallelConfig())
        except Exception as e:  # noqa: BLE001
            tried.append({"mode": mode, "dist": dist_mode, "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc(),
                          "seconds": round(time.perf_counter() - t, 2)})
            log(f"vLLM start ({mode}, {dist_mode}) failed: {type(e).__name__}: {e}")
            print(traceback.format_exc(), flush=True)
            _vllm_cleanup()
            continue
        S.vllm_mode = mode
        info = {"mode": mode, "dist": dist_mode, "start_seconds": round(time.perf_counter() - t, 2),
                "failed_attempts": tried,
                "llm_kwargs": {k: v for k, v in S.engine.llm_kwargs.items()},
                "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}
        try:  # which model runner / attention backend vLLM picked
            core = S.engine.llm.llm_engine.engine_core.engine_core
            w = core.model_executor.driver_worker.worker
            info["model_runner"] = type(w.model_runner).__module__ + "." + type(w.model_runner).__name__
            info["worker"] = type(w).__module__ + "." + type(w).__name__
            cc = S.engine.llm.llm_engine.vllm_config.compilation_config
            info["compilation"] = {"mode": str(cc.mode), "cudagraph_mode": str(cc.cudagraph_mode)}
            info["kv_cache_gib"] = round(getattr(w, "available_kv_cache_memory_bytes", 0) / GiB, 3)
        except Exception as e:  # noqa: BLE001
            info["introspection_error"] = f"{type(e).__name__}: {e}"
        return info
    raise RuntimeError(f"vLLM did not start in any mode: {[t['error'] for t in tried]}")


def _rowsums(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.reshape(t.shape[0], -1).sum(1, dtype=torch.float64) if t.dim() else t.double().view(1)


def _checksum(rows: torch.Tensor, offset: int = 0) -> tuple[float, float, int]:
    """(sum, row-position-weighted sum, rows): the weighted sum changes when rows move."""
    w = torch.arange(offset + 1, offset + 1 + rows.numel(), dtype=torch.float64, device=rows.device)
    return float(rows.sum()), float((rows * w).sum()), int(rows.numel())


def _expected_checksums(S, bucket_mb):
    """Per vLLM parameter (TP=1 layout): checksums of what the reshard stream sends, each
    fused part at its row offset ([q; k; v], [gate; up])."""
    from ovlt.rollout.reshard import iter_hf_weights, vllm_param_name
    m = S.mcfg
    hd = m.hidden_size // m.num_attention_heads
    off = {"q": 0, "k": m.num_attention_heads * hd, "v": (m.num_attention_heads + m.num_query_groups) * hd}
    out = {}
    for name, t in iter_hf_weights(S.model.state_dict(), m, bucket_mb=bucket_mb):
        vname, sid = vllm_param_name(name)
        if sid in ("q", "k", "v"):
            o = off[sid]
        elif sid == "1":
            o = m.vision.intermediate_size if vname.startswith("visual.") else m.ffn_hidden_size
        else:
            o = 0
        a, b, n = _checksum(_rowsums(t), o)
        s0 = out.get(vname, (0.0, 0.0, 0))
        out[vname] = (s0[0] + a, s0[1] + b, s0[2] + n)
    return out


def _vllm_checksums(S):
    def fn(model):
        return {n: _checksum(_rowsums(p)) for n, p in model.named_parameters()}
    return S.engine.llm.apply_model(fn)[0]


def st_update(S, a):
    from ovlt.rollout.reshard import iter_hf_weights
    S.bucket_mb = a.bucket_mb
    times = []
    for _ in range(a.update_reps):
        sd = S.model.state_dict()
        dt, _ = timed(lambda: S.engine.update_weights(iter_hf_weights(sd, S.mcfg, bucket_mb=a.bucket_mb)))
        times.append(dt)
    st = dict(S.engine.last_update)
    nbytes = st.get("bytes", 0)
    res = {"seconds": [round(t, 3) for t in times], "median_seconds": statistics.median(times),
           "bytes": nbytes, "GB_per_s": nbytes / statistics.median(times) / 1e9,
           "tensors": st.get("tensors"), "missing_vllm_params": st.get("missing"),
           "bucket_mb": a.bucket_mb}
    try:
        exp = _expected_checksums(S, a.bucket_mb)
        got = _vllm_checksums(S)
        bad = []
        for n, (s0, s1, rows) in got.items():
            if n not in exp:
                bad.append((n, "not in stream"))
                continue
            e0, e1, erows = exp[n]
            close = all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) + 1e-3 for x, y in ((e0, s0), (e1, s1)))
            if erows != rows or not close:
                bad.append((n, {"vllm": [s0, s1, rows], "stream": [e0, e1, erows]}))
        res["checksum"] = {"params": len(got), "stream_params": len(exp),
                           "not_in_vllm": sorted(set(exp) - set(got))[:10],
                           "mismatches": bad[:20], "n_mismatches": len(bad),
                           "exact": not bad and set(exp) <= set(got)}
    except Exception as e:  # noqa: BLE001
        res["checksum_error"] = f"{type(e).__name__}: {e}"
        res["checksum_traceback"] = traceback.format_exc()
    return res


def _first_div(x, y):
    for i, (p, q) in enumerate(zip(x, y)):
        if p != q:
            return i
    return None if len(x) == len(y) else min(len(x), len(y))


def st_vllm_greedy(S, a):
    from ovlt.rollout.base import SamplingParams
    sp = SamplingParams(temperature=0.0, max_new_tokens=a.greedy_new, logprobs=True)
    dt, outs = timed(lambda: S.engine.generate(S.reqs, sp))
    S.vllm_greedy = outs
    per = []
    total = agree = 0
    for b, v in zip(S.builtin_greedy, outs):
        x, y = b[0].token_ids, v[0].token_ids
        k = _first_div(x, y)
        same = sum(p == q for p, q in zip(x, y))
        total += max(len(x), len(y))
        agree += same
        per.append({"id": v[0].request_id, "len_builtin": len(x), "len_vllm": len(y),
                    "first_divergence": k, "positionwise_agree": same,
                    "vllm_text": v[0].text[:80]})
    return {"seconds": round(dt, 3), "per_prompt": per,
            "identical_prompts": sum(p["first_divergence"] is None for p in per),
            "n_prompts": len(per), "token_agreement": agree / max(total, 1),
            "prefix_agreement": sum((p["first_divergence"] if p["first_divergence"] is not None
                                     else p["len_vllm"]) for p in per) / max(total, 1)}


def st_vllm_sampling(S, a):
    """GRPO's call: n samples per prompt at T=1 / top-p 0.99 with a seed (reproducible?), and
    a stop string."""
    from ovlt.rollout.base import SamplingParams
    sp = SamplingParams(temperature=1.0, top_p=0.99, n=4, max_new_tokens=32, seed=1234)
    reqs = [S.reqs[0], S.reqs[-1]]
    o1 = S.engine.generate(reqs, sp)
    o2 = S.engine.generate(reqs, sp)
    ids1 = [[c.token_ids for c in cs] for cs in o1]
    ids2 = [[c.token_ids for c in cs] for cs in o2]
    stop_txt = S.vllm_greedy[0][0].text[5:9] if getattr(S, "vllm_greedy", None) else None
    stop_res = None
    if stop_txt and stop_txt.strip():
        so = S.engine.generate([S.reqs[0]], SamplingParams(temperature=0.0, max_new_tokens=a.greedy_new,
                                                           stop=[stop_txt]))[0][0]
        stop_res = {"stop": stop_txt, "text": so.text, "n_tokens": len(so.token_ids),
                    "finish": so.finish_reason, "ends_with_stop": so.text.endswith(stop_txt)}
    return {"n_per_prompt": [len(cs) for cs in o1],
            "distinct_samples": [len({tuple(x) for x in cs}) for cs in ids1],
            "seeded_reproducible": ids1 == ids2,
            "logprobs_len_ok": all(len(c.logprobs) == len(c.token_ids) for cs in o1 for c in cs),
            "mean_logprob": float(sum(sum(c.logprobs) for cs in o1 for c in cs) /
                                  max(1, sum(len(c.logprobs) for cs in o1 for c in cs))),
            "stop_string": stop_res}


@torch.no_grad()
def recompute(S, req, response_ids):
    """The trainer's log p(response token) (packed forward, fp32 logits) and the fp32 logits
    rows of the response positions."""
    from ovlt.grpo.batch import Rollout, make_micro_batch
    r = Rollout(prompt_ids=list(req.prompt_ids), response_ids=list(response_ids), group=0,
                pixel_values=req.pixel_values, image_grid_thw=req.image_grid_thw)
    mb = make_micro_batch([r], [0], S.rope_fn).to(S.device)
    h = S.model(input_ids=mb.input_ids, position_ids=mb.position_ids,
                pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw,
                packed_seq_params=mb.cu_seqlens, return_hidden=True)
    h = h.transpose(0, 1).reshape(-1, h.shape[-1])
    P, L = len(req.prompt_ids), len(req.prompt_ids) + len(response_ids)
    W = S.model.output_weight()[: S.mcfg.vocab_size]
    logits = h[P - 1: L - 1].float() @ W.float().t()
    lp = logits.log_softmax(-1)
    tgt = torch.as_tensor(response_ids, device=lp.device)
    return lp.gather(1, tgt[:, None]).squeeze(1).cpu(), logits


def st_logprobs(S, a):
    res = {"per_prompt": []}
    worst = {"vllm": 0.0, "builtin": 0.0, "vllm_vs_builtin_common_prefix": 0.0}
    for req, b, v in zip(S.reqs, S.builtin_greedy, getattr(S, "vllm_greedy", [None] * len(S.reqs))):
        row = {"id": req.request_id}
        bt = b[0].token_ids
        lp_b, logits_b = recompute(S, req, bt)
        d_b = (torch.tensor(b[0].logprobs) - lp_b).abs()
        row["builtin_max_abs"] = float(d_b.max())
        row["builtin_mean_abs"] = float(d_b.mean())
        worst["builtin"] = max(worst["builtin"], row["builtin_max_abs"])
        row["trainer_mean_logprob"] = float(lp_b.mean())
        if v is not None:
            vt = v[0].token_ids
            lp_v, logits_v = recompute(S, req, vt)
            got = torch.tensor(v[0].logprobs)
            d_v = (got - lp_v).abs()
            row["vllm_max_abs"] = float(d_v.max())
            row["vllm_mean_abs"] = float(d_v.mean())
            row["vllm_nan"] = int(torch.isnan(got).sum())
            worst["vllm"] = max(worst["vllm"], row["vllm_max_abs"])
            k = _first_div(bt, vt)
            n = len(vt) if k is None else k
            if n:
                dd = (torch.tensor(b[0].logprobs[:n]) - got[:n]).abs()
                row["vllm_vs_builtin_max_abs"] = float(dd.max())
                worst["vllm_vs_builtin_common_prefix"] = max(worst["vllm_vs_builtin_common_prefix"],
                                                             float(dd.max()))
            # is vLLM's greedy token the trainer's argmax (up to a bf16 tie)?
            am = logits_v.argmax(-1).cpu()
            top2 = logits_v.topk(2, dim=-1).values
            vt_dev = torch.as_tensor(vt, device=logits_v.device)[:, None]
            gap_v = (logits_v.max(-1).values - logits_v.gather(1, vt_dev).squeeze(1)).cpu()
            row["vllm_tokens_not_trainer_argmax"] = int((am != torch.tensor(vt)).sum())
            row["vllm_max_logit_shortfall"] = float(gap_v.max())
            row["median_top2_gap"] = float((top2[:, 0] - top2[:, 1]).median())
            if k is not None and k < min(len(bt), len(vt)):
                lrow = logits_v[k]
                row["divergence"] = {"position": k, "builtin_token": bt[k], "vllm_token": vt[k],
                                     "trainer_argmax": int(lrow.argmax()),
                                     "trainer_logit_builtin_tok": float(lrow[bt[k]]),
                                     "trainer_logit_vllm_tok": float(lrow[vt[k]]),
                                     "margin_vllm_minus_builtin": float(lrow[vt[k]] - lrow[bt[k]]),
                                     "logit_std": float(lrow.std())}
        res["per_prompt"].append(row)
    res["max_abs"] = worst
    return res


def _random_reqs(a, n, seed):
    from ovlt.rollout.base import GenerationRequest
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150000, (n, a.prompt_len), generator=g)
    return [GenerationRequest(prompt_ids=r.tolist(), request_id=f"rand{i}") for i, r in enumerate(ids)]


def st_throughput(S, a):
    from ovlt.rollout.base import SamplingParams
    from ovlt.rollout.builtin import BuiltinEngine
    res = {"batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new,
           "sampling": "T=1.0 top_p=0.99, EOS off"}
    sp = SamplingParams(temperature=1.0, top_p=0.99, max_new_tokens=a.new, seed=0, logprobs=True)
    warm = SamplingParams(temperature=1.0, top_p=0.99, max_new_tokens=8, seed=0)
    reqs = _random_reqs(a, a.batch, 1)
    if getattr(S, "engine", None) is not None:
        try:
            S.engine.generate(_random_reqs(a, a.batch, 2), warm)
            S.engine.llm.reset_prefix_cache()
            dt, outs = timed(lambda: S.engine.generate(reqs, sp))
            n = sum(len(c.token_ids) for o in outs for c in o)
            res["vllm"] = {"seconds": dt, "new_tokens": n, "tokens_per_s": n / dt,
                           "ms_per_step": 1000 * dt / a.new, "mode": getattr(S, "vllm_mode", None)}
            log(f"vllm throughput {res['vllm']}")
        except Exception as e:  # noqa: BLE001
            res["vllm_error"] = f"{type(e).__name__}: {e}"
            res["vllm_traceback"] = traceback.format_exc()
    graphs = torch.cuda.is_available()
    eng = BuiltinEngine(S.model, S.mcfg, eos_token_ids=[], max_batch_size=a.batch, cuda_graphs=graphs)
    t_first, _ = timed(lambda: eng.generate(reqs, sp))  # includes the CUDA-graph capture
    dt, outs = timed(lambda: eng.generate(reqs, sp))
    n = sum(len(c.token_ids) for o in outs for c in o)
    res["builtin"] = {"seconds": dt, "first_call_seconds": t_first, "new_tokens": n,
                      "tokens_per_s": n / dt, "ms_per_step": 1000 * dt / a.new,
                      "cuda_graphs": graphs}
    log(f"builtin throughput {res['builtin']}")
    eng.sleep()
    eng = None  # freed: the closures above read it
    if "vllm" in res:
        res["vllm_speedup_vs_builtin"] = res["vllm"]["tokens_per_s"] / res["builtin"]["tokens_per_s"]
    if a.hf_baseline:
        try:
            res["hf_generate"] = _hf_generate(S, a, reqs)
        except Exception as e:  # noqa: BLE001
            res["hf_generate_error"] = f"{type(e).__name__}: {e}"
            res["hf_generate_traceback"] = traceback.format_exc()
    return res


def _hf_generate(S, a, reqs):
    """HF transformers generate on the same weights (sdpa, bf16)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    from ovlt.rollout.reshard import iter_hf_weights
    hc = to_hf_config(S.mcfg)
    hc._attn_implementation = "sdpa"
    dt = torch.bfloat16 if S.mcfg.params_dtype == "bf16" else torch.float32
    with torch.device(S.device):
        hf = Qwen2_5_VLForConditionalGeneration._from_config(hc, dtype=dt)
    sd = hf.state_dict()

    def hf_key(n):  # ovlt streams the official names; transformers 5 nests them
        for k in (n, "model.language_model." + n[6:] if n.startswith("model.") else None,
                  "model." + n if n.startswith("visual.") else None):
            if k and k in sd:
                return k
        return None
    miss = []
    with torch.no_grad():
        for n, t in iter_hf_weights(S.model.state_dict(), S.mcfg):
            k = hf_key(n)
            if k is None:
                miss.append(n)
            else:
                sd[k].copy_(t)
    ids = torch.tensor([r.prompt_ids for r in reqs], device=S.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=0.99,
              max_new_tokens=a.new, min_new_tokens=a.new, eos_token_id=151645, pad_token_id=0)
    with torch.no_grad():
        hf.model.rope_deltas = None
        hf.generate(ids[:4], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4,
                                "attention_mask": torch.ones_like(ids[:4])})
        hf.model.rope_deltas = None
        t, out = timed(lambda: hf.generate(ids, **kw))
    n = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    hf = sd = None
    gc.collect()
    torch.cuda.empty_cache()
    return {"seconds": t, "new_tokens": n, "tokens_per_s": n / t, "unmapped": miss[:5]}


def st_sleep_wake(S, a):
    from ovlt.rollout.base import SamplingParams
    from ovlt.rollout.reshard import iter_hf_weights
    gc.collect()
    torch.cuda.empty_cache()
    m0 = mem()
    t, _ = timed(S.engine.sleep)
    gc.collect()
    torch.cuda.empty_cache()
    m1 = mem()
    t2, _ = timed(S.engine.wake)
    m2 = mem()
    t3, _ = timed(lambda: S.engine.update_weights(iter_hf_weights(S.model.state_dict(), S.mcfg,
                                                                  bucket_mb=a.bucket_mb)))
    sp = SamplingParams(temperature=0.0, max_new_tokens=a.greedy_new, logprobs=True)
    t4, outs = timed(lambda: S.engine.generate(S.reqs, sp))
    m3 = mem()
    before = getattr(S, "vllm_greedy", None)
    same = None
    if before is not None:
        same = [x[0].token_ids == y[0].token_ids for x, y in zip(before, outs)]
    return {"free_gib_awake": m0.get("free_gib"), "free_gib_asleep": m1.get("free_gib"),
            "freed_gib": round(m1["free_gib"] - m0["free_gib"], 3) if m0 and m1 else None,
            "free_gib_weights_awake": m2.get("free_gib"),
            "free_gib_after_generate": m3.get("free_gib"),
            "sleep_seconds": t, "wake_weights_seconds": t2, "update_seconds": t3,
            "generate_seconds_incl_kv_wake": t4,
            "greedy_identical_after_cycle": same}


def st_smoke_update(S, a):
    """CPU smoke: the reshard stream the vLLM engine would get (names, bytes, time)."""
    from ovlt.rollout.reshard import iter_hf_weights, vllm_param_name
    dt, named = timed(lambda: list(iter_hf_weights(S.model.state_dict(), S.mcfg, bucket_mb=a.bucket_mb)))
    names = sorted({vllm_param_name(n)[0] for n, _ in named})
    return {"seconds": dt, "tensors": len(named), "bytes": sum(t.numel() * t.element_size() for _, t in named),
            "vllm_params": len(names), "first": [n for n, _ in named[:3]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, no vLLM stages")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--logit-std", type=float, default=8.0)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="fp32: trainer, built-in engine and vLLM all in fp32 (greedy parity)")
    ap.add_argument("--greedy-new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--gpu-mem-util", type=float, default=0.45)
    ap.add_argument("--vllm-mode", choices=sorted(VLLM_MODES), default="graphs")
    ap.add_argument("--v1-runner", action="store_true", help="VLLM_USE_V2_MODEL_RUNNER=0")
    ap.add_argument("--update-reps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--hf-baseline", action="store_true")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip stages after this")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.greedy_new = min(args.greedy_new, 12)
        args.batch, args.prompt_len, args.new = min(args.batch, 4), min(args.prompt_len, 32), min(args.new, 16)
        args.image_size = min(args.image_size, 112)
    torch.backends.cuda.matmul.allow_tf32 = False
    run = Run(args)
    gpu = torch.cuda.is_available() and not args.cpu_smoke
    run.stage("env", st_env)
    if gpu:
        run.stage("vllm_import", st_vllm_import)
    run.stage("build", st_build)
    run.stage("hf_dir", st_hf_dir, needs=["build"])
    run.stage("prompts", st_prompts, needs=["build"])
    run.stage("processor_parity", st_processor_parity, needs=["prompts"])
    run.stage("builtin_greedy", st_builtin_greedy, needs=["prompts"])
    if gpu:
        run.stage("vllm_engine", st_vllm_engine, needs=["vllm_import", "build"])
        run.stage("update", st_update, needs=["vllm_engine"])
        run.stage("vllm_greedy", st_vllm_greedy, needs=["update", "builtin_greedy"])
        run.stage("vllm_sampling", st_vllm_sampling, needs=["update"])
    else:
        run.stage("smoke_update_stream", st_smoke_update, needs=["build"])
    run.stage("logprobs", st_logprobs, needs=["builtin_greedy"])
    run.stage("throughput", st_throughput, needs=["build"])
    if gpu:
        run.stage("sleep_wake", st_sleep_wake, needs=["update"])
    st = run.res["stages"]
    run.res["summary"] = {k: ("ok" if v.get("ok") else v.get("skipped") or v.get("error", "")[:200])
                          for k, v in st.items()}
    run.res["total_seconds"] = round(time.perf_counter() - T0, 1)
    run.save()
    log(f"summary {json.dumps(run.res['summary'], indent=1)}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

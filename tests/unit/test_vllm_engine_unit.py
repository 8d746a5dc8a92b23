"""The vLLM engine's contract with vLLM 0.26, checked without vLLM (CPU).

1. Weight names: every (HF name, tensor) of the trainer's reshard stream must reach a parameter
   of vLLM's Qwen2.5-VL through vLLM's own name mapping. The mapping tables below are copied
   (as test data) from the vLLM 0.26.0 source:
   - `vllm/model_executor/models/qwen2_5_vl.py`, `Qwen2_5_VLForConditionalGeneration.
     hf_to_vllm_mapper` (orig_to_new_prefix), applied by its `load_weights`;
   - `vllm/model_executor/models/qwen2.py`, `Qwen2Model.hf_to_vllm_mapper`
     (orig_to_new_stacked), applied by `Qwen2Model.load_weights` to names relative to
     `language_model.model.`; `Qwen2ForCausalLM.load_weights` skips `lm_head.` when tied;
   - `vllm/model_executor/models/qwen2_5_vl.py`, `Qwen2_5_VisionTransformer.hf_to_vllm_mapper`
     (orig_to_new_stacked), applied by its `load_weights` to names relative to `visual.`;
   and `vllm/model_executor/models/utils.py:WeightsMapper._map_name_with_shard` semantics (every
   matching stacked substring replaced once, then every matching prefix, in table order).
   The expected vLLM parameter names and shapes are written out from the module definitions
   (Qwen2DecoderLayer: qkv_proj / o_proj / gate_up_proj / down_proj; Qwen2_5_VisionBlock:
   norm1 / norm2 / attn.qkv / attn.proj / mlp.gate_up_proj / mlp.down_proj; patch merger
   ln_q / mlp.0 / mlp.2; Conv3dLayer weight [out, in, t, p, p]).
2. The engine's plumbing (prompt layout, SamplingParams, output conversion, sleep / wake /
   update calls) against a stand-in `vllm` module that records what it is given.
3. The worker extension against a stand-in model.
"""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from ovlt.models.qwen2_5_vl import state_dict_adapter as sda
from ovlt.rollout.reshard import iter_hf_weights, vllm_param_name

# ---- vLLM 0.26.0 mapping tables (test data, see module docstring) ----
TOP_PREFIX = {  # qwen2_5_vl.py Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper
    "model.language_model.": "language_model.model.",
    "model.visual.": "visual.",
    "lm_head.": "language_model.lm_head.",
    "model.": "language_model.model.",
}
QWEN2_STACKED = {  # qwen2.py Qwen2Model.hf_to_vllm_mapper
    ".q_proj": (".qkv_proj", "q"),
    ".k_proj": (".qkv_proj", "k"),
    ".v_proj": (".qkv_proj", "v"),
    ".gate_proj": (".gate_up_proj", 0),
    ".up_proj": (".gate_up_proj", 1),
}
VISION_STACKED = {  # qwen2_5_vl.py Qwen2_5_VisionTransformer.hf_to_vllm_mapper
    ".attn.q.": (".attn.qkv.", "q"),
    ".attn.k.": (".attn.qkv.", "k"),
    ".attn.v.": (".attn.qkv.", "v"),
    ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
    ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
}


def _stacked(key: str, table: dict):
    shard = None
    for sub, (new, sid) in table.items():
        if sub in key:
            key = key.replace(sub, new, 1)
            shard = sid
    return key, shard


def vllm_target(hf_name: str, tied: bool):
    """(vLLM parameter, shard id) that vLLM 0.26 loads `hf_name` into; None = skipped."""
    key = hf_name
    for pre, new in TOP_PREFIX.items():
        if key.startswith(pre):
            key = key.replace(pre, new, 1)
    if key.startswith("language_model."):
        rest = key[len("language_model."):]
        if rest.startswith("lm_head."):
            return None if tied else (key, None)
        if not rest.startswith("model."):
            raise AssertionError(f"{hf_name} -> {key}: no such module in Qwen2ForCausalLM")
        rel, sid = _stacked(rest[len("model."):], QWEN2_STACKED)
        return "language_model.model." + rel, sid
    if key.startswith("visual."):
        rel, sid = _stacked(key[len("visual."):], VISION_STACKED)
        return "visual." + rel, sid
    raise AssertionError(f"{hf_name} -> {key}: no such module in Qwen2_5_VLForConditionalGeneration")


def vllm_param_shapes(c) -> dict[str, tuple]:
    """The parameters of vLLM's Qwen2_5_VLForConditionalGeneration for config `c` (TP=1)."""
    v, H = c.vision, c.hidden_size
    hd = H // c.num_attention_heads
    out = {"language_model.model.embed_tokens.weight": (c.vocab_size, H),
           "language_model.model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        out["language_model.lm_head.weight"] = (c.vocab_size, H)
    qkv = (c.num_attention_heads + 2 * c.num_query_groups) * hd
    for i in range(c.num_layers):
        p = f"language_model.model.layers.{i}."
        out.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                    p + "self_attn.qkv_proj.weight": (qkv, H), p + "self_attn.qkv_proj.bias": (qkv,),
                    p + "self_attn.o_proj.weight": (H, H),
                    p + "mlp.gate_up_proj.weight": (2 * c.ffn_hidden_size, H),
                    p + "mlp.down_proj.weight": (H, c.ffn_hidden_size)})
    vh, vi = v.hidden_size, v.intermediate_size
    out["visual.patch_embed.proj.weight"] = (vh, v.in_channels, v.temporal_patch_size,
                                             v.patch_size, v.patch_size)
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        out.update({p + "norm1.weight": (vh,), p + "norm2.weight": (vh,),
                    p + "attn.qkv.weight": (3 * vh, vh), p + "attn.qkv.bias": (3 * vh,),
                    p + "attn.proj.weight": (vh, vh), p + "attn.proj.bias": (vh,),
                    p + "mlp.gate_up_proj.weight": (2 * vi, vh), p + "mlp.gate_up_proj.bias": (2 * vi,),
                    p + "mlp.down_proj.weight": (vh, vi), p + "mlp.down_proj.bias": (vh,)})
    m = vh * v.spatial_merge_size ** 2
    out.update({"visual.merger.ln_q.weight": (vh,), "visual.merger.mlp.0.weight": (m, m),
                "visual.merger.mlp.0.bias": (m,), "visual.merger.mlp.2.weight": (H, m),
                "visual.merger.mlp.2.bias": (H,)})
    return out


def _check_stream(named, c):
    """Every tensor lands in an existing vLLM parameter with a consistent shape; every vLLM
    parameter is filled completely (fused parameters by all their shards)."""
    tied = c.tie_word_embeddings
    want = vllm_param_shapes(c)
    rows: dict[str, dict] = {}
    hd = c.hidden_size // c.num_attention_heads
    for name, t in named:
        tgt = vllm_target(name, tied)
        if tgt is None:
            continue
        vname, sid = tgt
        assert vname in want, f"{name} -> {vname}: not a vLLM parameter"
        shape = want[vname]
        if sid is None:
            assert tuple(t.shape) == shape, f"{name}: {tuple(t.shape)} vs vLLM {vname} {shape}"
            rows.setdefault(vname, {})[None] = shape[0] if shape else 1
        else:
            assert tuple(t.shape[1:]) == shape[1:], f"{name}: {tuple(t.shape)} vs {vname} {shape}"
            if sid == "q":
                assert t.shape[0] == c.num_attention_heads * hd
            elif sid in ("k", "v"):
                assert t.shape[0] == c.num_query_groups * hd
            rows.setdefault(vname, {})[sid] = t.shape[0]
        # and the project's own vLLM layout agrees (reshard.vllm_param_name)
        assert vllm_param_name(name) == (vname, None if sid is None else str(sid)), name
    assert sorted(rows) == sorted(want), sorted(set(want) ^ set(rows))
    for vname, parts in rows.items():
        if None not in parts:
            expect = {"q", "k", "v"} if "qkv" in vname else {0, 1}
            assert set(parts) == expect, (vname, parts)
            assert sum(parts.values()) == want[vname][0], (vname, parts)


def _stream(c):
    g = torch.Generator().manual_seed(0)
    sd = {n: torch.randn(s, generator=g) for n, s in sda.mcore_shapes(c, 1, 1, 0).items()}
    return list(iter_hf_weights(sd, c))


@pytest.mark.parametrize("tied", [True, False])
def test_reshard_stream_names_map_onto_vllm_params(tiny_model_cfg, tied):
    c = copy.deepcopy(tiny_model_cfg)
    c.tie_word_embeddings = tied
    named = _stream(c)
    assert any(n.startswith("visual.blocks.") for n, _ in named)
    assert ("lm_head.weight" in dict(named)) == (not tied)
    _check_stream(named, c)


def test_transformers_checkpoint_names_map_onto_vllm_params(tiny_model_cfg):
    """The names of an HF checkpoint saved by this transformers (5.x: `model.language_model.*`,
    `model.visual.*`) also load (VLLMEngine.load_hf_dir, vLLM's own load_format=auto)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    c = copy.deepcopy(tiny_model_cfg)
    c.tie_word_embeddings = False
    with torch.device("meta"):
        m = Qwen2_5_VLForConditionalGeneration(to_hf_config(c))
    _check_stream(list(m.state_dict().items()), c)


def test_vllm_target_examples():
    assert vllm_target("model.layers.3.self_attn.k_proj.bias", False) == \
        ("language_model.model.layers.3.self_attn.qkv_proj.bias", "k")
    assert vllm_target("model.language_model.layers.0.mlp.up_proj.weight", False) == \
        ("language_model.model.layers.0.mlp.gate_up_proj.weight", 1)
    assert vllm_target("model.visual.blocks.1.mlp.gate_proj.bias", False) == \
        ("visual.blocks.1.mlp.gate_up_proj.bias", 0)
    assert vllm_target("visual.blocks.1.attn.qkv.weight", False) == ("visual.blocks.1.attn.qkv.weight", None)
    assert vllm_target("lm_head.weight", True) is None


# --------------------------------------------------------------------------- engine plumbing
class _Logprob:
    def __init__(self, lp):
        self.logprob = lp


class _FakeLLM:
    """Records the calls VLLMEngine makes on `vllm.LLM` (signatures as in vLLM 0.26)."""

    def __init__(self, **kw):
        self.kw = kw
        self.calls = []
        self.llm_engine = types.SimpleNamespace(
            engine_core=type("InprocClient", (), {})(),
            reset_encoder_cache=lambda: self.calls.append(("reset_encoder_cache",)))

    def generate(self, prompts, sps, use_tqdm=True):
        self.calls.append(("generate", prompts, sps))
        assert isinstance(sps, list) and len(sps) == len(prompts)  # one per request
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, sps)):
            comps = []
            for j in range(sp.kw["n"]):
                ids = [10 + i, 20 + j, 151645]
                lps = [{t: _Logprob(-0.5 * (k + 1))} for k, t in enumerate(ids)]
                comps.append(types.SimpleNamespace(index=j, token_ids=ids, text=f"t{i}{j}",
                                                   logprobs=lps if sp.kw.get("logprobs") == 0 else None,
                                                   finish_reason="stop" if i == 0 else "length"))
            outs.append(types.SimpleNamespace(outputs=comps[::-1]))  # index order restored
        return outs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        named = list(args[0])  # the worker consumes the generator
        self.calls.append(("collective_rpc", method, [n for n, _ in named]))
        return [{"tensors": len(named), "bytes": 0, "missing": []}]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset_prefix_cache",))
        return True

    def sleep(self, level=1, mode="abort"):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


class _FakeSP:
    def __init__(self, **kw):
        self.kw = kw


@pytest.fixture()
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.__version__ = "0.26.0"
    mod.LLM = _FakeLLM
    mod.SamplingParams = _FakeSP
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return mod


def _cfg(tmp_path, **rollout):
    from ovlt.config import CONFIG_ROOT, load_config
    cfg = load_config(CONFIG_ROOT / "grpo" / "tiny_cpu.yaml")
    cfg.model.hf_path = str(tmp_path)
    for k, v in rollout.items():
        setattr(cfg.rollout, k, v)
    return cfg


def test_llm_kwargs_are_vllm_026_arguments(tmp_path):
    """Every keyword exists in vLLM 0.26 (`LLM.__init__` or `EngineArgs` fields, copied from
    vllm/entrypoints/llm.py and vllm/engine/arg_utils.py) with an accepted value."""
    from ovlt.rollout.vllm_engine import llm_kwargs
    known = {"model", "load_format", "dtype", "seed", "tensor_parallel_size",
             "gpu_memory_utilization", "enable_sleep_mode", "max_model_len", "enforce_eager",
             "enable_prefix_caching", "limit_mm_per_prompt", "mm_processor_kwargs",
             "worker_extension_cls", "logprobs_mode", "distributed_executor_backend"}
    cfg = _cfg(tmp_path, temperature=1.0, max_prompt_length=100, max_new_tokens=28)
    kw = llm_kwargs(cfg, str(tmp_path))
    assert set(kw) <= known, set(kw) - known
    assert kw["logprobs_mode"] == "raw_logprobs" and kw["max_model_len"] == 128
    assert kw["load_format"] == "dummy" and kw["enable_sleep_mode"] is True
    assert kw["limit_mm_per_prompt"] == {"image": 8, "video": 0}
    assert kw["worker_extension_cls"] == "ovlt.rollout.vllm_worker.OvltWorkerExtension"
    size = kw["mm_processor_kwargs"]["size"]
    assert size == {"shortest_edge": cfg.data.min_pixels, "longest_edge": cfg.data.max_pixels}
    cfg.rollout.temperature = 0.7
    assert llm_kwargs(cfg, str(tmp_path))["logprobs_mode"] == "processed_logprobs"
    cfg.rollout.temperature = 0.0
    assert llm_kwargs(cfg, str(tmp_path))["logprobs_mode"] == "raw_logprobs"
    import importlib
    assert importlib.import_module("ovlt.rollout.vllm_worker").OvltWorkerExtension


def test_engine_generate_update_sleep_plumbing(fake_vllm, tmp_path):
    from PIL import Image

    from ovlt.rollout.base import GenerationRequest, SamplingParams
    from ovlt.rollout.vllm_engine import VLLMEngine
    import os
    cfg = _cfg(tmp_path)
    eng = VLLMEngine(cfg)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    llm = eng.llm
    assert llm.kw["load_format"] == "dummy" and "distributed_executor_backend" not in llm.kw
    P = cfg.model.image_token_id
    img = Image.new("RGB", (56, 56))
    reqs = [GenerationRequest(prompt_ids=[1, 151652, P, P, P, P, 151653, 2], images=[img],
                              pixel_values=torch.zeros(16, 1176), request_id="a"),
            GenerationRequest(prompt_ids=[3, 4], request_id="b")]
    reqs[1].max_new_tokens, reqs[1].seed = 3, 99
    seen = []
    out = eng.generate(reqs, SamplingParams(temperature=1.0, top_p=0.9, n=2, max_new_tokens=5,
                                            seed=7, stop=["</answer>"]),
                       on_complete=lambda i, c: seen.append((i, c.index, c)))
    _, prompts, sps = llm.calls[-1]
    assert len(llm.calls) == 1  # every request in one generate call
    assert prompts[0] == {"prompt_token_ids": [1, 151652, P, 151653, 2],
                          "multi_modal_data": {"image": [img]}}
    assert prompts[1] == {"prompt_token_ids": [3, 4]}
    from ovlt.rollout.base import derived_seed
    assert sps[0].kw == dict(n=2, temperature=1.0, top_p=0.9, top_k=0, max_tokens=5,
                             stop=["</answer>"], include_stop_str_in_output=True,
                             seed=derived_seed(7, 0), logprobs=0, skip_special_tokens=True,
                             stop_token_ids=[151645, 151643])
    # the request's own cap and seed
    assert sps[1].kw == {**sps[0].kw, "max_tokens": 3, "seed": 99}
    assert [(i, j) for i, j, _ in seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(out[i][j] is c for i, j, c in seen)
    assert [[c.token_ids for c in cs] for cs in out] == [[[10, 20, 151645], [10, 21, 151645]],
                                                         [[11, 20, 151645], [11, 21, 151645]]]
    assert out[0][0].logprobs == [-0.5, -1.0, -1.5] and out[0][1].request_id == "a"
    assert [cs[0].finish_reason for cs in out] == ["stop", "length"]
    # no log-probs asked: none returned; overrides reach vLLM
    out = eng.generate(reqs[1:], SamplingParams(logprobs=False, max_new_tokens=3), min_tokens=3)
    assert out[0][0].logprobs == [] and llm.calls[-1][2][0].kw["min_tokens"] == 3
    # greedy with n > 1: vLLM refuses it, so the engine decodes once and copies
    seen.clear()
    out = eng.generate(reqs[1:], SamplingParams(temperature=0.0, n=3, max_new_tokens=3),
                       on_complete=lambda i, c: seen.append((i, c.index)))
    assert llm.calls[-1][2][0].kw["n"] == 1 and llm.calls[-1][2][0].kw["temperature"] == 0.0
    assert [c.token_ids for c in out[0]] == [[10, 20, 151645]] * 3
    assert out[0][0].logprobs is not out[0][1].logprobs
    assert [c.index for c in out[0]] == [0, 1, 2] and seen == [(0, 0), (0, 1), (0, 2)]
    # ignore_eos: no EOS ids, vLLM's ignore_eos
    eng.generate(reqs[1:], SamplingParams(ignore_eos=True, max_new_tokens=4))
    kw = llm.calls[-1][2][0].kw
    assert kw["ignore_eos"] is True and "stop_token_ids" not in kw and kw["max_tokens"] == 3
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        eng.generate([GenerationRequest(prompt_ids=[1], max_new_tokens=0)], SamplingParams())
    with pytest.raises(ValueError, match="PIL images"):
        eng.generate([GenerationRequest(prompt_ids=[P], pixel_values=torch.zeros(4, 1176))],
                     SamplingParams())
    with pytest.raises(ValueError, match="no images"):
        eng.generate([GenerationRequest(prompt_ids=[1, P, 2])], SamplingParams())

    # trainer cycle: sleep -> wake (weights) -> update -> generate (wakes the KV cache)
    llm.calls.clear()
    eng.sleep()
    eng.sleep()  # idempotent
    with pytest.raises(RuntimeError, match="after sleep"):
        eng.generate(reqs[1:], SamplingParams())
    eng.wake()
    eng.update_weights((n, torch.zeros(1)) for n in ["a.weight", "b.weight"])
    eng.generate(reqs[1:], SamplingParams(max_new_tokens=2))
    assert [c[:2] for c in llm.calls] == [
        ("sleep", 2), ("wake_up", ["weights"]), ("collective_rpc", "ovlt_load_weights"),
        ("reset_prefix_cache",), ("reset_encoder_cache",), ("wake_up", ["kv_cache"]),
        ("generate", [{"prompt_token_ids": [3, 4]}])]
    assert llm.calls[2][2] == ["a.weight", "b.weight"]
    assert eng.last_update["tensors"] == 2
    # update while asleep wakes the weights itself; sleep with only the weights awake
    llm.calls.clear()
    eng.sleep()
    eng.update_weights(iter([("c", torch.zeros(1))]))
    eng.sleep()
    assert [c[0] for c in llm.calls] == ["sleep", "wake_up", "collective_rpc", "reset_prefix_cache",
                                         "reset_encoder_cache", "wake_up", "sleep"]
    assert llm.calls[5] == ("wake_up", ["kv_cache"])


def test_engine_decodes_text_itself_unless_stop_strings_need_vllms(fake_vllm, tmp_path):
    """With a tokenizer and no stop strings, vLLM is asked not to detokenize (its incremental
    detokenizer runs per sequence per step) and each completion's text is decoded once from
    its tokens, special tokens skipped; stop strings keep vLLM's text (it matches them there)."""
    from ovlt.data.tokenizer import load_tokenizer
    from ovlt.rollout.base import GenerationRequest, SamplingParams
    from ovlt.rollout.vllm_engine import VLLMEngine
    tok = load_tokenizer()
    eng = VLLMEngine(_cfg(tmp_path), tokenizer=tok)
    reqs = [GenerationRequest(prompt_ids=[3, 4], request_id="a")]
    out = eng.generate(reqs, SamplingParams(n=2, max_new_tokens=3))
    assert eng.llm.calls[-1][2][0].kw["detokenize"] is False
    for j, c in enumerate(out[0]):
        assert c.token_ids == [10, 20 + j, 151645]
        assert c.text == tok.decode([10, 20 + j, 151645], skip_special_tokens=True)
        assert c.text == tok.decode([10, 20 + j]) and "<|im_end|>" not in c.text
    out = eng.generate(reqs, SamplingParams(n=1, max_new_tokens=3, stop=["</answer>"]))
    assert "detokenize" not in eng.llm.calls[-1][2][0].kw and out[0][0].text == "t00"
    plain = VLLMEngine.__new__(VLLMEngine)  # no tokenizer: vLLM's text
    plain.__dict__.update(eng.__dict__, tokenizer=None)
    out = plain.generate(reqs, SamplingParams(n=1, max_new_tokens=3))
    assert "detokenize" not in eng.llm.calls[-1][2][0].kw and out[0][0].text == "t00"


def test_engine_eos_and_external_launcher(fake_vllm, tmp_path, monkeypatch):
    from ovlt.rollout.base import SamplingParams
    from ovlt.rollout.vllm_engine import VLLMEngine
    cfg = _cfg(tmp_path, tensor_parallel=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    cfg.parallel.tensor_parallel = 2
    eng = VLLMEngine(cfg, eos_token_ids=[])
    assert eng.llm.kw["distributed_executor_backend"] == "external_launcher"
    assert eng.llm.kw["tensor_parallel_size"] == 2
    kw = eng.sampling_params(SamplingParams()).kw
    assert kw["ignore_eos"] is True and "stop_token_ids" not in kw
    cfg.parallel.tensor_parallel = 1  # vLLM TP group would span two trainer DP replicas
    with pytest.raises(ValueError, match="must divide"):
        VLLMEngine(cfg)


def test_make_engine_reuses_the_process_vllm_engine(monkeypatch, tmp_path):
    import ovlt.rollout as rollout
    import ovlt.rollout.vllm_engine as ve
    made = []

    class Fake:
        def __init__(self, cfg, tokenizer=None, load_format="dummy", **kw):
            made.append(load_format)
            self.hf_dir = cfg.model.hf_path
            self.loaded = []

        def same_shape(self, d):
            return d.endswith("same")

        def load_hf_dir(self, d):
            self.loaded.append(d)

    monkeypatch.setattr(rollout, "vllm_available", lambda: True)
    monkeypatch.setattr(ve, "VLLMEngine", Fake)
    monkeypatch.setattr(rollout, "_VLLM_ENGINES", {})
    cfg = _cfg(tmp_path, engine="auto")
    a = rollout.make_engine(cfg, model=torch.nn.Linear(1, 1))
    assert made == ["dummy"] and rollout.make_engine(cfg, model=torch.nn.Linear(1, 1)) is a
    cfg2 = copy.deepcopy(cfg)
    cfg2.model.hf_path = str(tmp_path / "same")
    assert rollout.make_engine(cfg2) is a and a.loaded == [str(tmp_path / "same")]
    cfg2.model.hf_path = str(tmp_path / "other")
    with pytest.raises(RuntimeError, match="cannot host a second"):
        rollout.make_engine(cfg2)
    assert made == ["dummy"]


def test_gpu_memory_utilization_from_free_memory():
    from ovlt.rollout.vllm_engine import GIB, gpu_memory_utilization_for
    # 80 GiB card, trainer resident leaves 50 GiB: 50 - 2 reserve = 48 -> 0.6
    assert gpu_memory_utilization_for(50 * GIB, 80 * GIB) == 0.6
    # 8 GiB of optimizer states still to come: (50 - 2 - 8) / 80
    assert gpu_memory_utilization_for(50 * GIB, 80 * GIB, pending_bytes=8 * GIB) == 0.5
    # rounded down: (40.5 - 1) / 80 = 0.49375 -> 0.493
    assert gpu_memory_utilization_for(int(40.5 * GIB), 80 * GIB, reserve_bytes=GIB) == 0.493
    # an empty card is capped
    assert gpu_memory_utilization_for(80 * GIB, 80 * GIB, reserve_bytes=0) == 0.95
    with pytest.raises(ValueError, match=r"vLLM would get 1.00 GiB.*needs at least 15.00 GiB"):
        gpu_memory_utilization_for(3 * GIB, 80 * GIB, need_bytes=15 * GIB)
    with pytest.raises(ValueError, match="vLLM would get -1.00 GiB"):
        gpu_memory_utilization_for(GIB, 80 * GIB)
    with pytest.raises(ValueError, match="not a measurement"):
        gpu_memory_utilization_for(90 * GIB, 80 * GIB)


def test_engine_measures_its_share_when_config_says_zero(fake_vllm, tmp_path, monkeypatch):
    from ovlt.rollout.vllm_engine import GIB, VLLMEngine, llm_kwargs
    cfg = _cfg(tmp_path, gpu_memory_utilization=0.0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (42 * GIB, 80 * GIB))
    eng = VLLMEngine(cfg, pending_bytes=10 * GIB)
    assert eng.llm.kw["gpu_memory_utilization"] == 0.375   # (42 - 2 - 10) / 80
    cfg.rollout.gpu_memory_utilization = 0.3                # an explicit share is kept
    assert VLLMEngine(cfg).llm.kw["gpu_memory_utilization"] == 0.3
    cfg.rollout.gpu_memory_utilization = 0.0
    with pytest.raises(ValueError, match="means: measure it"):
        llm_kwargs(cfg, str(tmp_path))


# --------------------------------------------------------------------------- worker extension
def test_worker_extension_loads_through_model_load_weights():
    from ovlt.rollout.vllm_worker import OvltWorkerExtension

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(2))
            self.b = torch.nn.Parameter(torch.zeros(3))

        def load_weights(self, weights):
            done = set()
            for n, t in weights:
                getattr(self, n).data.copy_(t)
                done.add(n)
            return done

    w = OvltWorkerExtension()
    w.model_runner = types.SimpleNamespace(model=Model())
    w.vllm_config = None
    if not torch.cuda.is_available():
        w_sync = torch.cuda.synchronize
        torch.cuda.synchronize = lambda *a, **k: None
    try:
        stats = w.ovlt_load_weights((n, t) for n, t in [("a", torch.ones(2))])
    finally:
        if not torch.cuda.is_available():
            torch.cuda.synchronize = w_sync
    assert stats == {"tensors": 1, "bytes": 8, "missing": ["b"]}
    assert torch.equal(w.model_runner.model.a, torch.ones(2))


def test_engine_returns_torch_cached_blocks_before_every_wake(fake_vllm, tmp_path, monkeypatch):
    """vLLM allocates through its own allocator: what torch caches after the update must go
    back to the GPU before vLLM re-allocates its weights or KV cache."""
    from ovlt.rollout.base import GenerationRequest, SamplingParams
    from ovlt.rollout.vllm_engine import VLLMEngine
    eng = VLLMEngine(_cfg(tmp_path))
    llm = eng.llm
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: llm.calls.append(("empty_cache",)))
    eng.sleep()
    eng.wake()
    eng.update_weights(iter([("a.weight", torch.zeros(1))]))
    eng.generate([GenerationRequest(prompt_ids=[3, 4])], SamplingParams(max_new_tokens=2))
    names = [c[0] for c in llm.calls]
    assert names == ["sleep", "empty_cache", "wake_up", "collective_rpc", "reset_prefix_cache",
                     "reset_encoder_cache", "empty_cache", "wake_up", "generate"]
    assert [c[1] for c in llm.calls if c[0] == "wake_up"] == [["weights"], ["kv_cache"]]


def test_pending_bytes_count_adam_moments_until_the_first_step(monkeypatch, tmp_path):
    """What vLLM's measured share must leave free: the Adam moments torch creates at the
    first step (8 bytes per fp32 parameter), none once they exist; make_engine hands the
    amount to the vLLM engine only."""
    import ovlt.rollout as rollout
    import ovlt.rollout.vllm_engine as ve
    from ovlt.engine.optimizer import unallocated_state_bytes
    w, b = torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))
    adam = torch.optim.AdamW([w, b], lr=1e-3)
    mcore_like = types.SimpleNamespace(chained_optimizers=[types.SimpleNamespace(optimizer=adam),
                                                           types.SimpleNamespace()])
    assert unallocated_state_bytes(mcore_like) == 2 * 4 * (15 + 7)
    (w.sum() + b.sum()).backward()
    adam.step()
    assert unallocated_state_bytes(mcore_like) == 0
    got = {}

    class Fake:
        def __init__(self, cfg, tokenizer=None, **kw):
            got.update(kw)
            self.hf_dir = cfg.model.hf_path

    monkeypatch.setattr(rollout, "vllm_available", lambda: True)
    monkeypatch.setattr(ve, "VLLMEngine", Fake)
    monkeypatch.setattr(rollout, "_VLLM_ENGINES", {})
    rollout.make_engine(_cfg(tmp_path, engine="auto"), model=torch.nn.Linear(1, 1),
                        pending_bytes=12345)
    assert got["pending_bytes"] == 12345

"""One tree of typed config dataclasses, loaded from YAML with `key.sub=value` overrides.

Every section is a dataclass; `load_config(path, overrides)` merges, in order:
  1. the files named under a top-level `defaults:` list (paths relative to the YAML file or to
     `configs/`), recursively;
  2. the YAML file itself;
  3. the CLI overrides.
Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the key and
what is allowed. Sections may be extended by their owners: add a typed field with a default.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message names the key."""


# --------------------------------------------------------------------------- sections
@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    in_channels: int = 3
    rms_norm_eps: float = 1e-6


@dataclass
class ModelConfig:
    name: str = "qwen2_5_vl_7b"
    # HF directory of the base model (weights loaded through the state-dict adapter); None =
    # random init from the shape below (tests, demo's first build).
    hf_path: Optional[str] = None
    vocab_size: int = 152064
    hidden_size: int = 3584
    num_layers: int = 28
    num_attention_heads: int = 28
    num_query_groups: int = 4
    ffn_hidden_size: int = 18944
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    # Embedding/LM-head rows are padded to a multiple of this x TP. 1 = pad only to a TP
    # multiple: Qwen vocabs (151936, 152064) split evenly for every TP <= 128, and no padded
    # rows means the fused log-prob kernels see exactly the real vocabulary.
    make_vocab_size_divisible_by: int = 1
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision: VisionConfig = field(default_factory=VisionConfig)
    # Layer implementation: "local" = mcore linears (with ovlt's FP8 linears under a scaled_mm_*
    # fp8); "te" = Transformer Engine layers (explicit only: not yet proven on a GPU); "auto" =
    # "local", never TE until its spec has passed parity on a GPU.
    transformer_impl: Literal["auto", "te", "local"] = "auto"
    # "te" needs transformer_impl=te; "auto" = flash-attn varlen on CUDA when it imports, else
    # torch SDPA (TE's attention with transformer_impl=te).
    attention_backend: Literal["auto", "flash", "te", "sdpa"] = "auto"
    # FP8: "none"; te_delayed / te_current (need transformer_impl=te); or ovlt's
    # torch._scaled_mm layers, scaled_mm_* (local layers).
    fp8: Literal["none", "te_delayed", "te_current", "scaled_mm_tensor", "scaled_mm_delayed",
                 "scaled_mm_rowwise"] = "none"
    # Gradient format of the ovlt scaled_mm FP8 path (forward is always e4m3).
    fp8_grad_format: Literal["e5m2", "e4m3"] = "e5m2"
    # scaled_mm_delayed: scales from the max amax of each tensor's last N casts (>= 3)
    fp8_amax_history: int = 16
    # scaled_mm FP8: the forward GEMM in the tensor cores' fast FP8 accumulation, as TE's recipes
    # (dgrad / wgrad always promote partial sums to fp32). Off: on an H200 cuBLAS then picks a
    # slower kernel for the 7B fc1 (1.75 vs 1.62 ms) and no layer GEMM gains more than 8 %.
    fp8_fprop_fast_accum: bool = False
    # scaled_mm per-tensor FP8: cast each trained weight once per optimizer step, up front, and
    # reuse it in every micro-batch (holds 2 bytes per such weight for the step); frozen weights
    # once for the run (1 byte per frozen FP8 weight, kept)
    fp8_weight_cache: bool = True
    params_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    # Timeout of every process group, in minutes (collectives fail with a rank-tagged error).
    timeout_minutes: float = 30.0
    backend: Literal["auto", "nccl", "gloo"] = "auto"


@dataclass
class DataConfig:
    # SFT: sharegpt JSON/JSONL files; RL: parquet files. Or a registry YAML of several sources.
    sft_files: list[str] = field(default_factory=list)
    rl_files: list[str] = field(default_factory=list)
    registry: Optional[str] = None
    image_root: Optional[str] = None
    min_pixels: int = 3136
    max_pixels: int = 262144
    max_length: int = 2048
    # Token budget of one packed micro-batch (THD); 0 = max_length.
    pack_tokens: int = 0
    num_workers: int = 2
    image_loader: Literal["auto", "dali", "pil"] = "auto"
    strict: bool = False
    seed: int = 1234


@dataclass
class OptimizerConfig:
    lr: float = 5e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int = 0
    use_distributed_optimizer: bool = True


@dataclass
class TrainConfig:
    """Shared by SFT and GRPO."""
    global_batch_size: int = 32
    micro_batch_size: int = 1
    epochs: float = 1.0
    max_steps: int = 0  # 0 = derived from epochs
    seed: int = 42
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    freeze: list[str] = field(default_factory=lambda: ["vision", "merger"])
    recompute: Literal["none", "selective", "full"] = "none"
    save_dir: str = "runs/default/ckpt"
    save_interval: int = 0  # steps; 0 = only at the end
    # Save and exit (without the final export) every this many steps of one invocation, for
    # time-limited / preemptible jobs; re-running the same command resumes. 0 = never.
    exit_interval: int = 0
    keep_last: int = 2
    # Save a checkpoint at the last step (off only for throughput runs: nothing to resume).
    save_final: bool = True
    export_hf: bool = True
    log_interval: int = 1
    # Python garbage collection every this many steps on every rank, automatic collection off
    # during training (an unscheduled collection on one rank stalls the others at the next
    # collective; `training.gc_schedule`). 0 = Python's automatic collection.
    gc_interval: int = 50
    # CUDA caching allocator settings (`key:value,...` as in PYTORCH_CUDA_ALLOC_CONF; the
    # environment variable wins when set). "auto" = expandable_segments:True for SFT, PyTorch's
    # default for GRPO (rollout engines); "" = PyTorch's default. `ovlt.utils.cuda_alloc`.
    cuda_alloc_conf: str = "auto"
    # Budget (MiB) of the one live logits chunk in the fused LM-head loss of SFT. With the
    # weight gradient accumulated into the fp32 main_grad, each chunk is one more fp32 pass
    # over the V x H gradient: 2 GiB covers ~7K loss tokens at V=152K (bf16) in one chunk.
    # 0 = the kernels' default (448 MiB).
    lm_head_chunk_mib: int = 2048
    profile_steps: list[int] = field(default_factory=list)
    tensorboard: bool = False
    wandb: bool = False


@dataclass
class SFTConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class CurriculumStage:
    name: str = "medium"
    rl_files: list[str] = field(default_factory=list)
    epochs: float = 1.0
    freeze_vision: bool = True


@dataclass
class GRPOConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(global_batch_size=128))
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        lr=1e-6, lr_schedule="constant", warmup_ratio=0.0))
    prompts_per_step: int = 512
    samples_per_prompt: int = 5
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    kl_coef: float = 0.01
    kl_type: Literal["low_var_kl", "k1", "k2", "k3", "mse"] = "low_var_kl"
    loss_agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = "token_mean"
    # memory: a second model on the device; offload: that model's weights in pinned host
    # memory but for the reference pass (copied in behind the old log-prob pass); swap / cpu:
    # the policy's own parameters hold the reference weights for the pass (ovlt.grpo.passes.Reference)
    ref_mode: Literal["memory", "offload", "swap", "cpu"] = "memory"
    # Keep a reference policy for the KL *metric* even when kl_coef = 0.
    track_kl: bool = False
    # "module:function" replacing the math reward: fn(response, ground_truth, **kw) -> float
    # (kw: rewards.partial_credit, fallback and style, as math_reward takes them).
    reward_fn: str = ""
    filter_zero_advantage: bool = True
    overlong: Literal["none", "mask", "penalty"] = "mask"
    overlong_penalty: float = 0.0
    # Dynamic batch sizing: max tokens per micro-batch in the update (0 = micro_batch_size).
    max_tokens_per_micro_batch: int = 0
    curriculum: list[CurriculumStage] = field(default_factory=list)
    rollout_log_samples: int = 8


@dataclass
class RolloutConfig:
    engine: Literal["auto", "vllm", "builtin"] = "auto"
    temperature: float = 1.0
    top_p: float = 0.99
    top_k: int = -1
    max_new_tokens: int = 2048
    max_prompt_length: int = 6144
    stop: list[str] = field(default_factory=list)
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.5  # 0 = sized from the free memory the update leaves
    colocate: bool = True
    weight_bucket_mb: int = 512
    cuda_graphs: bool = True
    # Built-in engine on a GPU: the decode step's pointwise work through torch.compile
    # (fused RMSNorm / rotary / SwiGLU / residuals; compiled once, before the first rollout).
    compile_decode: bool = True
    # Built-in engine: decode slots (a finished sample's slot takes the next waiting one; 128
    # was the fastest of 64-192 on the recipe's length mix at 7B shape).
    max_batch_size: int = 128
    prompt_suffix: str = (
        " You FIRST think about the reasoning process as an internal monologue and then provide "
        "the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
        "The final answer MUST BE put in <answer> </answer> tags.")


@dataclass
class RewardConfig:
    # ovlt (default) | openvlthinker (its GRPO reward and RL prompt, quirks included) | easyr1
    # (EasyR1's math.py reward and prompt); docs/REWARDS.md compares them.
    style: Literal["ovlt", "openvlthinker", "easyr1"] = "ovlt"
    # ovlt style only (the reference styles refuse it): credit for a partly right collection.
    partial_credit: float = 0.0
    # (1 - w) * accuracy + w * format; None = the style's own w (0.1 for easyr1, else 0).
    format_weight: Optional[float] = None
    timeout_s: float = 5.0
    num_workers: int = 2
    # ovlt style only: what to grade when there is no <answer> tag or box.
    fallback: Literal["none", "last_number", "last_line"] = "none"


@dataclass
class EvalBenchmark:
    name: Literal["mathvista", "mathverse", "mathvision"] = "mathvista"
    data: str = ""
    limit: int = 0


@dataclass
class EvalConfig:
    benchmarks: list[EvalBenchmark] = field(default_factory=list)
    max_new_tokens: int = 2048
    batch_size: int = 32
    engine: Literal["auto", "vllm", "builtin"] = "auto"
    llm_judge_url: Optional[str] = None


@dataclass
class TeacherConfig:
    # Who writes round 1's reasoning chains from caption + question:
    #   synthetic = the synthetic generator's step-by-step solutions (embedded demo, no model);
    #   openai = an OpenAI-compatible chat endpoint (`vllm serve QwQ-32B`) at `url`;
    #   engine = an in-process rollout engine on the HF text model at `model_path`.
    kind: Literal["synthetic", "openai", "engine"] = "synthetic"
    url: Optional[str] = None
    model: str = "QwQ-32B"
    model_path: Optional[str] = None
    # Name of the environment variable holding the endpoint's API key (never the key itself).
    api_key_env: str = "OPENAI_API_KEY"
    samples: int = 4
    max_tokens: int = 4096
    temperature: float = 0.7
    top_p: float = 0.95
    timeout_s: float = 600.0
    retries: int = 3
    retry_backoff_s: float = 2.0
    concurrency: int = 8
    # Synthetic teacher only: also emit this many deliberately wrong chains per problem, so the
    # verify filter has something to reject (0 = only the correct solution).
    synthetic_wrong: int = 1
    # Problems drawn from the pool for the teacher in round 1 (0 = all): the teacher is the
    # expensive part (a 32B reasoning model per chain), later rounds' self-answers are not.
    problems: int = 0


@dataclass
class CaptionConfig:
    # Round 1: the base model writes a caption of each image for the (text-only) teacher.
    enabled: bool = True
    prompt: str = ("Describe this image in detail, including every number, label, shape and "
                   "relation needed to answer questions about it.")
    max_new_tokens: int = 512


@dataclass
class FilterConfig:
    # Keep only chains whose answer verifies, the shortest one per problem, and cut the
    # self-reflection tail at the first `cut_marker` after a correct answer.
    cut_at_wait: bool = True
    cut_marker: str = "Wait,"
    # Keep a problem only when at least this many of its candidates verify (1 = the recipe);
    # 2+ drops answers guessed right once behind a wrong chain (ovlt.iterate.filter).
    min_verified: int = 1


@dataclass
class SelfAnswerConfig:
    # Rounds > 1: the previous round's GRPO model answers from the image, `samples` per problem.
    samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    batch_size: int = 16
    # Problems sampled from the pool for self-answering each round (0 = the whole pool).
    problems: int = 0
    # Not in the recipe: a problem the model did not solve keeps the previous round's chain
    # (counted in stats.json as carried_over), so a weak model cannot empty the SFT set.
    carry_over_unsolved: bool = False


@dataclass
class PrepareConfig:
    # Question pool (RL parquet: problem, answer, images[, difficulty]); empty = synthesize.
    pool_files: list[str] = field(default_factory=list)
    # SFT-format solutions for the synthetic teacher (sharegpt JSONL); empty = synthesize.
    solution_files: list[str] = field(default_factory=list)
    synth_n: int = 0
    synth_seed: int = 1
    heldout_n: int = 0
    heldout_seed: int = 2
    # Problems drawn from the pool each round for SFT data (0 = all).
    pool_per_round: int = 0
    # GRPO curriculum built from the pool's `difficulty` column: one stage per entry, in order
    # (e.g. [medium, hard]); empty = keep grpo.curriculum / data.rl_files as configured.
    curriculum_difficulties: list[str] = field(default_factory=list)
    curriculum_epochs: list[float] = field(default_factory=list)
    # Per stage: is the vision tower frozen? Empty = the recipe's (frozen in the first stage,
    # trained from the second on). A tiny random tower whose features the SFT model learned to
    # read is better kept frozen throughout: GRPO's noisy updates move what the LLM reads.
    curriculum_freeze_vision: list[bool] = field(default_factory=list)
    # Task families of the synthesized pool and held-out split (`ovlt.data.synth.TASKS`);
    # empty = the five chart/geometry/table families.
    synth_tasks: list[str] = field(default_factory=list)


@dataclass
class ProbeConfig:
    # Does each round's GRPO raise its reward? The first `prompts` held-out problems, sampled
    # `samples` times each from the SFT model and from the GRPO model with the same seed and
    # scored like the trainer scores rollouts (ovlt.iterate.probe); 0 prompts = off.
    prompts: int = 32
    samples: int = 8
    seed: int = 1234
    # Only held-out problems of these difficulties (empty = all), e.g. the GRPO curriculum's.
    difficulties: list[str] = field(default_factory=list)
    temperature: Optional[float] = None      # None = rollout.temperature
    max_new_tokens: Optional[int] = None     # None = rollout.max_new_tokens
    batch_size: int = 64


@dataclass
class IterateConfig:
    name: str = "openvlthinker"
    out_dir: str = "runs"
    rounds: int = 3
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    self_answer: SelfAnswerConfig = field(default_factory=SelfAnswerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # Processes per stage (each stage is its own torchrun).
    nproc_data: int = 1
    nproc_sft: int = 1
    nproc_grpo: int = 1
    nproc_eval: int = 1
    nnodes_data: int = 1
    nnodes_sft: int = 1
    nnodes_grpo: int = 1
    nnodes_eval: int = 1
    # Cap on kept SFT examples per round (0 = no cap).
    sft_examples_per_round: int = 3000
    heldout_files: list[str] = field(default_factory=list)
    # Evaluate the base model as round 0 (the baseline the rounds are compared against).
    eval_round0: bool = True
    heldout_max_new_tokens: int = 256
    # Programs run per stage (script path relative to the repo root, or "-m module"); tests
    # swap in fake stages here.
    program_prepare: str = "-m ovlt.iterate.stage_prepare"
    program_data: str = "-m ovlt.iterate.stage_data"
    program_sft: str = "launchers/sft.py"
    program_grpo: str = "launchers/grpo.py"
    program_eval: str = "-m ovlt.iterate.stage_eval"
    # Where SFT/GRPO write the exported HF model, relative to their train.save_dir.
    hf_export_subdir: str = "final_hf"
    # A killed SFT/GRPO stage keeps its directory so the trainer resumes from its last
    # checkpoint (they resume from save_dir automatically); false = restart it from scratch.
    resume_trainers: bool = True
    # Stage launching: local torchrun, or srun + torchrun rendezvous inside a SLURM allocation.
    launcher: Literal["local", "slurm"] = "local"
    master_port: int = 29400
    # Environment for every stage process (KEY=VALUE), e.g. OMP_NUM_THREADS=1.
    stage_env: list[str] = field(default_factory=list)


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)


# --------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` against annotation `tp`; raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: "
                              + ", ".join(repr(a) for a in allowed))
        return value
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping with keys "
                              f"{sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if math.isnan(value):
            raise ConfigError(f"{key}: expected a number, got NaN")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def allowed_values(cls, name: str) -> tuple:
    """The values the Literal field `name` of config dataclass `cls` allows."""
    return get_args(_hints(cls)[name])


def from_dict(cls, data: dict, prefix: str = ""):
    """The config dataclass `cls` from a nested dict, values coerced to the field types;
    an unknown key is a ConfigError naming it and the allowed keys."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = prefix or "top level"
            raise ConfigError(f"{prefix + '.' if prefix else ''}{k}: unknown key in {where}; "
                              f"allowed keys: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}")
    obj = cls()
    for k, v in kwargs.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            v = from_dict(hints[k], v, k)
        setattr(obj, k, v)
    return obj


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML would keep the
    last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML reports it itself
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first on line {first})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def yaml_load(text: str):
    """Parse YAML safely, refusing duplicate keys (yaml.YAMLError)."""
    return yaml.load(text, Loader=_YamlLoader)


def _read_yaml(path: Path, _seen: tuple = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular 'defaults' include")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                          "save the file as UTF-8") from None
    try:
        data = yaml_load(text)
    except yaml.MarkedYAMLError as e:  # one line: where and what
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    merged: dict = {}
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML paths")
    for inc in defaults:
        cand = [path.parent / inc, CONFIG_ROOT / inc]
        found = next((c for c in cand if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: defaults entry {inc!r} not found (looked in "
                              f"{path.parent} and {CONFIG_ROOT})")
        merged = _deep_merge(merged, _read_yaml(found, _seen + (path.resolve(),)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() != "" else ""
    except yaml.constructor.ConstructorError as e:  # e.g. a duplicate key in {a: 1, a: 2}
        raise ConfigError(f"override {text!r}: {e.problem}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(d: dict, parts: list[str], value: Any) -> None:
    """d[parts[0]][parts[1]]... = value, making the dicts on the way."""
    for p in parts[:-1]:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            d[p] = nxt
        d = nxt
    d[parts[-1]] = value


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None,
                world_size: Optional[int] = None,
                trainers: tuple[str, ...] = ("sft", "grpo")) -> JobConfig:
    """Load, override, type-check and validate. `world_size` enables parallel checks of the
    batch sizes of `trainers` (a launcher names only its own: stages may differ in size)."""
    data: dict = _read_yaml(Path(path)) if path else {}
    for ov in overrides or []:
        parts, value = parse_override(ov)
        set_path(data, parts, value)
    cfg = from_dict(JobConfig, data)
    validate(cfg, world_size, trainers)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | os.PathLike) -> None:
    from ovlt.utils.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_layer_choice(m: ModelConfig) -> None:
    """The model.transformer_impl / fp8 / attention_backend combinations that exist (the layer
    backend is chosen from them in `ovlt.models.qwen2_5_vl.specs.backend_for`)."""
    te = m.transformer_impl == "te"
    if m.fp8.startswith("te_") and not te:
        raise ConfigError(
            f"model.fp8={m.fp8} is a Transformer Engine recipe and model.transformer_impl="
            f"{m.transformer_impl} does not select TE ('auto' never does: the TE layers are not "
            "yet proven on a GPU). Use model.fp8=scaled_mm_delayed|scaled_mm_tensor|"
            "scaled_mm_rowwise (ovlt's FP8) or model.transformer_impl=te")
    if m.fp8.startswith("scaled_mm") and te:
        raise ConfigError(f"model.fp8={m.fp8} is ovlt's FP8 for the local layers; with "
                          "model.transformer_impl=te use model.fp8=te_delayed|te_current")
    if m.attention_backend == "te" and not te:
        raise ConfigError(f"model.attention_backend=te needs model.transformer_impl=te (got "
                          f"{m.transformer_impl}); the local layers take flash, sdpa or auto")


# Value ranges, by key: (lowest, highest, whether the lowest itself is allowed). None = open.
# Floats must also be finite unless the highest is math.inf.
_AT_LEAST_1 = (1, None, True)
_AT_LEAST_0 = (0, None, True)
_POSITIVE = (0, None, False)
_UNIT = (0.0, 1.0, True)
_RANGES: dict[str, tuple] = {
    **{f"model.{k}": _AT_LEAST_1 for k in (
        "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
        "ffn_hidden_size", "max_position_embeddings")},
    "model.rope_theta": _POSITIVE, "model.rms_norm_eps": _POSITIVE,
    **{f"model.vision.{k}": _AT_LEAST_1 for k in (
        "depth", "hidden_size", "num_heads", "intermediate_size", "patch_size",
        "temporal_patch_size", "spatial_merge_size", "window_size", "in_channels")},
    "parallel.timeout_minutes": _POSITIVE,
    "data.min_pixels": _AT_LEAST_1, "data.max_pixels": _AT_LEAST_1,
    "data.max_length": _AT_LEAST_1, "data.pack_tokens": _AT_LEAST_0,
    "data.num_workers": _AT_LEAST_0,
    **{f"{sec}.train.{k}": r for sec in ("sft", "grpo") for k, r in (
        ("epochs", _AT_LEAST_0), ("max_steps", _AT_LEAST_0), ("save_interval", _AT_LEAST_0),
        ("exit_interval", _AT_LEAST_0), ("keep_last", _AT_LEAST_0),
        ("log_interval", _AT_LEAST_1))},
    **{f"{sec}.optimizer.{k}": r for sec in ("sft", "grpo") for k, r in (
        ("lr", _AT_LEAST_0), ("min_lr", _AT_LEAST_0), ("weight_decay", _AT_LEAST_0),
        ("adam_beta1", (0.0, 1.0, True)), ("adam_beta2", (0.0, 1.0, True)),
        ("adam_eps", _POSITIVE), ("clip_grad", _AT_LEAST_0), ("warmup_ratio", _UNIT),
        ("warmup_steps", _AT_LEAST_0))},
    "grpo.prompts_per_step": _AT_LEAST_1, "grpo.kl_coef": _AT_LEAST_0,
    "grpo.overlong_penalty": _AT_LEAST_0, "grpo.max_tokens_per_micro_batch": _AT_LEAST_0,
    "grpo.rollout_log_samples": _AT_LEAST_0,
    "rollout.max_new_tokens": _AT_LEAST_1, "rollout.max_prompt_length": _AT_LEAST_1,
    "rollout.tensor_parallel": _AT_LEAST_1, "rollout.gpu_memory_utilization": _UNIT,
    "rollout.weight_bucket_mb": _AT_LEAST_1, "rollout.max_batch_size": _AT_LEAST_1,
    "rewards.timeout_s": _POSITIVE, "rewards.num_workers": _AT_LEAST_0,
    "rewards.partial_credit": _UNIT, "rewards.format_weight": _UNIT,
    "eval.max_new_tokens": _AT_LEAST_1, "eval.batch_size": _AT_LEAST_1,
    "iterate.rounds": _AT_LEAST_1, "iterate.sft_examples_per_round": _AT_LEAST_0,
    "iterate.heldout_max_new_tokens": _AT_LEAST_1, "iterate.master_port": (1, 65535, True),
    **{f"iterate.{k}_{st}": _AT_LEAST_1 for k in ("nproc", "nnodes")
       for st in ("data", "sft", "grpo", "eval")},
    "iterate.teacher.samples": _AT_LEAST_1, "iterate.teacher.max_tokens": _AT_LEAST_1,
    "iterate.teacher.temperature": _AT_LEAST_0, "iterate.teacher.top_p": (0.0, 1.0, False),
    "iterate.teacher.timeout_s": _POSITIVE, "iterate.teacher.retries": _AT_LEAST_0,
    "iterate.teacher.retry_backoff_s": _AT_LEAST_0, "iterate.teacher.concurrency": _AT_LEAST_1,
    "iterate.teacher.synthetic_wrong": _AT_LEAST_0,
    "iterate.caption.max_new_tokens": _AT_LEAST_1, "iterate.filter.min_verified": _AT_LEAST_1,
    "iterate.teacher.problems": _AT_LEAST_0, "iterate.probe.prompts": _AT_LEAST_0,
    "iterate.probe.samples": _AT_LEAST_1, "iterate.probe.batch_size": _AT_LEAST_1,
    "iterate.probe.temperature": _AT_LEAST_0, "iterate.probe.max_new_tokens": _AT_LEAST_1,
    "iterate.self_answer.samples": _AT_LEAST_1, "iterate.self_answer.temperature": _AT_LEAST_0,
    "iterate.self_answer.top_p": (0.0, 1.0, False),
    "iterate.self_answer.max_new_tokens": _AT_LEAST_1,
    "iterate.self_answer.batch_size": _AT_LEAST_1, "iterate.self_answer.problems": _AT_LEAST_0,
    **{f"iterate.prepare.{k}": _AT_LEAST_0 for k in ("synth_n", "heldout_n", "pool_per_round")},
}


def _get_path(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_ranges(cfg: JobConfig) -> None:
    """Every key of `_RANGES` within its range (ConfigError naming the key and the range)."""
    for key, (lo, hi, lo_ok) in _RANGES.items():
        v = _get_path(cfg, key)
        if v is None:
            continue
        bad = (isinstance(v, float) and not math.isfinite(v)) or (
            lo is not None and (v < lo or (v == lo and not lo_ok))) or (
            hi is not None and v > hi)
        if bad:
            lo_s = "" if lo is None else (f">= {lo}" if lo_ok else f"> {lo}")
            hi_s = "" if hi is None else f"<= {hi}"
            rng = " and ".join(x for x in (lo_s, hi_s) if x)
            raise ConfigError(f"{key}={v!r}: must be {rng}" + ("" if math.isfinite(float(v))
                                                                   else " (a finite number)"))
    for lst, sub in (("eval.benchmarks", "limit"), ("grpo.curriculum", "epochs")):
        for i, item in enumerate(_get_path(cfg, lst)):
            if getattr(item, sub) < 0 or not math.isfinite(getattr(item, sub)):
                raise ConfigError(f"{lst}[{i}].{sub}={getattr(item, sub)!r}: must be >= 0")


def _check_combinations(cfg: JobConfig) -> None:
    """Checks across keys that assume each key is within its range."""
    for sec in ("sft", "grpo"):
        t, o = getattr(cfg, sec).train, getattr(cfg, sec).optimizer
        if t.max_steps == 0 and t.epochs == 0:
            raise ConfigError(f"{sec}.train.epochs=0 with {sec}.train.max_steps=0: nothing to "
                              "train; set one of them above 0")
        if o.min_lr > o.lr:
            raise ConfigError(f"{sec}.optimizer.min_lr={o.min_lr} exceeds {sec}.optimizer.lr="
                              f"{o.lr}")
    v = cfg.model.vision
    unit = (v.patch_size * v.spatial_merge_size) ** 2
    if cfg.data.max_pixels < unit:
        raise ConfigError(f"data.max_pixels={cfg.data.max_pixels}: must be >= {unit}, one "
                          f"{v.patch_size * v.spatial_merge_size}x"
                          f"{v.patch_size * v.spatial_merge_size} merged patch")


def validate(cfg: JobConfig, world_size: Optional[int] = None,
             trainers: tuple[str, ...] = ("sft", "grpo")) -> None:
    """Cross-field checks; each names the keys involved and the allowed values."""
    check_ranges(cfg)
    from ovlt.utils.cuda_alloc import resolve_alloc_conf
    p, m = cfg.parallel, cfg.model
    for k in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
        if getattr(p, k) < 1:
            raise ConfigError(f"parallel.{k}: must be >= 1, got {getattr(p, k)}")
    if m.num_attention_heads % p.tensor_parallel:
        raise ConfigError(f"parallel.tensor_parallel={p.tensor_parallel} must divide "
                          f"model.num_attention_heads={m.num_attention_heads}")
    if m.num_query_groups % p.tensor_parallel:
        raise ConfigError(f"parallel.tensor_parallel={p.tensor_parallel} must divide "
                          f"model.num_query_groups={m.num_query_groups}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"model.num_query_groups={m.num_query_groups} must divide "
                          f"model.num_attention_heads={m.num_attention_heads}")
    if m.num_layers < p.pipeline_parallel:
        raise ConfigError(f"parallel.pipeline_parallel={p.pipeline_parallel} exceeds "
                          f"model.num_layers={m.num_layers}")
    if sum(m.mrope_section) * 2 != m.hidden_size // m.num_attention_heads:
        raise ConfigError(f"model.mrope_section={m.mrope_section}: sum*2 must equal head dim "
                          f"{m.hidden_size // m.num_attention_heads}")
    check_layer_choice(m)
    if m.fp8_amax_history < 3:
        raise ConfigError(f"model.fp8_amax_history={m.fp8_amax_history}: must be >= 3 (each cast "
                          "writes one slot and clears the next)")
    if m.make_vocab_size_divisible_by < 1:
        raise ConfigError("model.make_vocab_size_divisible_by must be >= 1")
    if m.vision.hidden_size % m.vision.num_heads:
        raise ConfigError("model.vision.num_heads must divide model.vision.hidden_size")
    if p.sequence_parallel and p.tensor_parallel == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")
    for sec in ("sft", "grpo"):
        t = getattr(cfg, sec).train
        if t.micro_batch_size < 1 or t.global_batch_size < 1:
            raise ConfigError(f"{sec}.train: batch sizes must be >= 1")
        if t.gc_interval < 0:
            raise ConfigError(f"{sec}.train.gc_interval={t.gc_interval}: must be >= 0 "
                              "(0 = Python's automatic collection)")
        try:
            resolve_alloc_conf(t.cuda_alloc_conf, sec,
                               hosts_vllm=sec == "grpo" and cfg.rollout.engine == "vllm")
        except ValueError as e:
            raise ConfigError(f"{sec}.train.cuda_alloc_conf={t.cuda_alloc_conf!r}: {e}") from None
        if t.lm_head_chunk_mib < 0:
            raise ConfigError(f"{sec}.train.lm_head_chunk_mib={t.lm_head_chunk_mib}: must be >= 0 "
                              "(0 = the kernels' default chunk)")
        for fz in t.freeze:
            if fz not in ("vision", "merger", "llm"):
                raise ConfigError(f"{sec}.train.freeze: {fz!r} not allowed; allowed values: "
                                  "'vision', 'merger', 'llm'")
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError(f"data.min_pixels={cfg.data.min_pixels} > data.max_pixels="
                          f"{cfg.data.max_pixels}")
    rw = cfg.rewards
    if rw.style != "ovlt" and (rw.partial_credit or rw.fallback != "none"):
        raise ConfigError(f"rewards.style={rw.style} reproduces its reference as is; "
                          "rewards.partial_credit and rewards.fallback need rewards.style=ovlt")
    r = cfg.rollout
    if not 0.0 < r.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p={r.top_p}: must be in (0, 1]")
    if r.temperature < 0:
        raise ConfigError(f"rollout.temperature={r.temperature}: must be >= 0 (0 = greedy)")
    it = cfg.iterate
    if it.prepare.synth_tasks:
        from ovlt.data.synth import GENERATORS
        unknown = [t for t in it.prepare.synth_tasks if t not in GENERATORS]
        if unknown:
            raise ConfigError(f"iterate.prepare.synth_tasks: {unknown} not allowed; allowed "
                              f"values: {sorted(GENERATORS)}")
    ncur = len(it.prepare.curriculum_difficulties)
    for key in ("curriculum_epochs", "curriculum_freeze_vision"):
        got = len(getattr(it.prepare, key))
        if got and got != ncur:
            raise ConfigError(f"iterate.prepare.{key}: {got} entries for {ncur} "
                              "iterate.prepare.curriculum_difficulties (one per stage)")
    for key, n in (("iterate.teacher.samples", it.teacher.samples),
                   ("iterate.self_answer.samples", it.self_answer.samples)):
        if it.filter.min_verified > n:
            raise ConfigError(f"iterate.filter.min_verified={it.filter.min_verified} exceeds "
                              f"{key}={n}: no problem could keep a chain")
    g = cfg.grpo
    if g.samples_per_prompt < 1:
        raise ConfigError("grpo.samples_per_prompt must be >= 1")
    if g.clip_low < 0 or g.clip_high < 0 or (g.dual_clip and g.dual_clip <= 1.0):
        raise ConfigError("grpo.clip_low/clip_high must be >= 0 and grpo.dual_clip > 1 (or 0 = off)")
    _check_combinations(cfg)
    if world_size is not None:
        mp = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
        if world_size % mp:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor_parallel"
                              f" x pipeline_parallel x context_parallel = {mp}")
        dp = world_size // mp
        for sec in trainers:
            t = getattr(cfg, sec).train
            if t.global_batch_size % (t.micro_batch_size * dp):
                raise ConfigError(
                    f"{sec}.train.global_batch_size={t.global_batch_size} must be a multiple of "
                    f"{sec}.train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}")


def require_unpadded_vocab(cfg: JobConfig) -> None:
    """GRPO's fused log-prob/loss kernels read the LM head directly: padded vocab rows would
    enter their softmax as real tokens, so the head must hold exactly the real vocabulary."""
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    mult = m.make_vocab_size_divisible_by * tp
    if m.vocab_size % mult:
        raise ConfigError(f"model.vocab_size={m.vocab_size} must be a multiple of "
                          f"model.make_vocab_size_divisible_by x parallel.tensor_parallel = {mult} "
                          "for GRPO's fused kernels; use model.make_vocab_size_divisible_by=1")

"""What the SFT and GRPO trainers share: the model set-up, the step, the optimizer, and the
machinery around a training loop.

    model_setup      build_vl_model, freeze_modules, apply_recompute, configure_fp8,
                     wrap_model -> ModelBundle (mcore DDP, per-token-loss contract)
    grad_routing     who writes each weight's main_grad and how (one typed record per weight);
                     zeroing the grad buffers minus the weights whose gradient GEMM overwrites
    train_step       train_step / train_step_async -> PendingStep -> StepResult (mcore
                     schedules, 1F1B for PP, loss = sum / global tokens, no host sync)
    optimizer        build_optimizer (mcore DistributedOptimizer + fused AdamW), the pending
                     per-token gradient scale folded into the update
    lr_schedule      LRSchedule (warmup + cosine / linear / constant)
    checkpoint       save_checkpoint / load_checkpoint / find_latest (reshardable, atomic)
    loop             TrainLoop: the save / exit / export decisions both trainers share
    hf_io            load_hf_weights, export_hf (streamed gather -> HF directory)
    lm_head          the LM head's inputs: loss rows, host-side forward inputs, TP group
    vision_prefetch  the frozen vision tower run one step ahead
    flops            train_step_flops, peak_flops -> MFU
    metrics_logger   MetricsLogger (log line, metrics.jsonl, TensorBoard / W&B, tqdm), memory_gb
    gc_schedule      GCSchedule (Python GC at chosen steps only)
    profiler         StepProfiler (torch profiler trace of chosen steps)
"""

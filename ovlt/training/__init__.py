"""Trainers and their shared building blocks (SFT here; GRPO reuses the same pieces).

    model_setup   build_vl_model (provider + HF base weights), freeze_modules, apply_recompute,
                  configure_fp8, wrap_model -> ModelBundle (mcore DDP, per-token-loss contract)
    optimizer     build_optimizer (mcore Adam / DistributedOptimizer, fp32 master weights)
    lr_schedule   LRSchedule (warmup + cosine / linear / constant), .apply(optimizer, step)
    step          train_step(chunks, optimizer, micro_batches, forward_fn, loss_fn) -> StepResult:
                  mcore get_forward_backward_func (1F1B for PP), loss = sum / global tokens;
                  train_step_async -> PendingStep: the same, queued without a host sync
    checkpoint    save_checkpoint / load_checkpoint / find_latest (dist-checkpointing,
                  reshardable, atomic, keep-last-K, RNG + trainer state)
    hf_io         load_hf_weights, export_hf (streamed gather -> HF directory)
    flops         train_step_flops (vision + merger + LLM), peak_flops -> MFU
    metrics       MetricsLogger (log line, metrics.jsonl, TensorBoard / W&B, tqdm), memory_gb
    profiler      StepProfiler (torch profiler trace of chosen steps)
    sft_data      SFT dataset + resumable per-step packed micro-batches
    sft           run_sft: the SFT loop (launchers/sft.py)
"""

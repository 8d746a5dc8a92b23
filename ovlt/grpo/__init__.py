"""GRPO with verifiable rewards, read in the order of one step:

    data        PromptStream (curriculum stages, resumable position), encode_record
    advantages  scoring through the reward pool, group advantages, zero-advantage filtering
    batch       Rollout, RLMicroBatch, pack_rollouts (token-budget packing), split_updates
    passes      the model-facing half: log-prob passes, the reference policy, the update
    train       GRPOTrainer.step (rollout -> rewards -> log-probs -> updates -> weight sync)
                and run_grpo, the loop behind `launchers/grpo.py`
"""

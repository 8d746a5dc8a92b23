"""ovlt: OpenVLThinker-style iterative SFT + GRPO for Qwen2.5-VL on megatron-core."""
__version__ = "0.1.0"

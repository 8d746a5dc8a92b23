# ovlt on NGC PyTorch (ships Transformer Engine, apex, flash-attn, DALI-compatible CUDA).
FROM nvcr.io/nvidia/pytorch:25.10-py3
WORKDIR /opt/ovlt
COPY setup.py README.md pytest.ini ./
COPY ovlt ./ovlt
COPY launchers ./launchers
COPY configs ./configs
COPY benchmarks ./benchmarks
COPY tests ./tests
# TE / flash-attn / apex come with the base image; [gpu] adds vLLM, DALI, Liger.
RUN pip install --no-cache-dir -e ".[gpu,dev]"
ENV HF_HUB_OFFLINE=1
ENTRYPOINT ["ovlt"]

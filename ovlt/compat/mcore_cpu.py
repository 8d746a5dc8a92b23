"""The ONE megatron-core compatibility shim for machines without a GPU (CPU CI, laptops).

megatron-core 0.16.1 assumes CUDA in a few places that our CPU path reaches:

1. `torch.cuda.current_device()` is used as a `device=` argument (e.g. the inverse frequencies
   of `MultimodalRotaryEmbedding.__init__`, sequence-parallel gather buffers). A CPU build of
   torch raises there. We make it return `torch.device("cpu")` — only when CUDA is unavailable,
   so nothing can mistake the CPU for a GPU on a real GPU machine.
2. The tensor-parallel RNG tracker (`get_cuda_rng_tracker`, `model_parallel_cuda_manual_seed`)
   stores and swaps *CUDA* generator states. We swap its two state accessors for the CPU
   generator and install a tracker class that seeds/forks the CPU generator, so dropout inside
   `tracker.fork()` and TP-rank-dependent seeding keep mcore's semantics on CPU.
3. `LanguageModule.setup_embeddings_and_output_layer` (tied embeddings with PP > 1) moves the
   shared weight with `.cuda()` before its embedding-group all-reduce. Only during that call,
   `Tensor.cuda` returns the tensor itself (the all-reduce then runs on gloo, on CPU).

4. mcore's *training* path (DDP buffers, DistributedOptimizer, grad clipping, schedules,
   dist-checkpointing) hard-codes CUDA: `torch.tensor(..., device='cuda')` (found_inf, overflow
   buffers, token counters), `param.type() == 'torch.cuda.FloatTensor'` checks, `tensor.cuda()`
   in the optimizer-state gather, `torch.cuda.synchronize()` in the checkpoint writer. The
   trainer runs those calls inside `cuda_free_mode()`: a scoped `TorchFunctionMode` mapping
   CUDA devices to the CPU and answering `Tensor.type()` with the CUDA spelling mcore compares
   against (a no-op when CUDA is available).

Parameters must be created with `TransformerConfig(use_cpu_initialization=True)` on CPU
(`provider.build_model` does it), which keeps mcore's layer constructors off CUDA.
Nothing else in ovlt patches megatron-core. `apply()` is idempotent and a no-op with a GPU.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from ovlt.logging import get_logger

log = get_logger(__name__)
_APPLIED = False


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _get_rng_state(device="cuda", clone=False, graph_safe=False):  # same signature as mcore's
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _make_cpu_tracker(base):
    class CpuRNGStatesTracker(base):
        """mcore's `CudaRNGStatesTracker` semantics on the CPU default generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig = self.states_[orig_name]
                torch.set_rng_state(orig)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def _wrap_setup_embeddings(cls) -> None:
    orig = cls.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return orig(self, *args, **kwargs)

    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def apply() -> bool:
    """Install the CPU shim once. Returns True when it is (or already was) active."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = _cpu_current_device
    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state
    mrandom.CudaRNGStatesTracker = _make_cpu_tracker(mrandom.CudaRNGStatesTracker)
    _wrap_setup_embeddings(LanguageModule)
    # A tracker created before the shim would hold CUDA semantics: drop it.
    mrandom.initialize_rng_tracker(force_reset=True)
    _APPLIED = True
    log.info("megatron-core CPU shim applied (current_device -> cpu, RNG tracker on CPU, "
             "tied-embedding setup without .cuda())")
    return True


# --------------------------------------------------------------------- 4. training path
def _cpu(dev):
    return "cpu" if dev is not None and str(dev).startswith("cuda") else dev


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # e.g. torch.FloatTensor -> torch.cuda.FloatTensor
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_free_mode():
    """Context in which mcore's CUDA-only training code runs on the CPU (no-op on GPU)."""
    if torch.cuda.is_available():
        yield
        return
    saved_sync = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None  # nothing to wait for on the CPU
    try:
        with _CudaToCpuMode():
            yield
    finally:
        torch.cuda.synchronize = saved_sync

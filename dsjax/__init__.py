"""dsjax: DeepSeek's open infrastructure for JAX and Flax.

Components (imported on first access, so ``import dsjax`` stays light):
``dsjax.deep_gemm`` (FP8 quantizers and GEMMs), ``dsjax.flash_mla`` (MLA decoding over a paged
latent cache), ``dsjax.deep_ep`` (expert-parallel dispatch/combine), ``dsjax.dualpipe`` (pipeline
schedules and executor), ``dsjax.eplb`` (expert load balancer), ``dsjax.io`` (3FS reader / grain
source), ``dsjax.nn`` (Flax NNX DeepSeek-V3 layers). ``dsjax.backends()`` says which
implementations (reference, CPU FFI, CUDA FFI) can run in this process and why not.
"""

import importlib
from typing import Any

from dsjax._src.ffi import backends

__version__ = "0.1.0"

_SUBMODULES = ("deep_gemm", "flash_mla", "deep_ep", "dualpipe", "eplb", "io", "nn", "bench")

__all__ = ["backends", "__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"dsjax.{name}")
    raise AttributeError(f"module 'dsjax' has no attribute {name!r}")

"""dsjax: DeepSeek's open infrastructure for JAX and Flax.

Components: ``dsjax.deep_gemm`` (FP8 quantizers and GEMMs), ``dsjax.flash_mla``, ``dsjax.deep_ep``,
``dsjax.dualpipe``, ``dsjax.eplb``, ``dsjax.io``. ``dsjax.backends()`` says which implementations
(reference, CPU FFI, CUDA FFI) can run in this process and why not.
"""

from dsjax._src.ffi import backends

__version__ = "0.1.0"

__all__ = ["backends", "__version__"]

"""dsjax.train: the project's main job (``dsjax prepare`` / ``train`` / ``generate``) as a library.

* :mod:`dsjax.train.data`: byte-level token shards from text files (default: the Python standard
  library's own sources, present on every machine) through :func:`dsjax.io.write_token_shards`.
* :mod:`dsjax.train.mesh`: mesh-shape parsing and the simulated CPU devices.
* :mod:`dsjax.train.loop`: training a DeepSeek-V3-style model with expert parallelism (DeepEP),
  aux-loss-free balancing, EPLB load tracking, AdamW, orbax checkpoints and exact resume.
* :mod:`dsjax.train.generate`: batched generation through the paged MLA cache and FlashMLA.

Heavy imports (JAX) happen inside the functions, so the CLI can set up devices first.
"""

class UsageError(Exception):
    """Bad user input (paths, shapes, flags); the CLI prints it as one line and exits with 2."""


__all__ = ["UsageError"]

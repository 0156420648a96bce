"""``dsjax generate``: batched generation from a training run's checkpoint.

Every layer keeps a :class:`dsjax.flash_mla.PagedMLACache` of 576-wide latent rows and attends
with weight absorption through ``flash_mla_with_kvcache`` (:meth:`dsjax.nn.model.DeepSeekV3.decode`),
as DeepSeek-V3 serves. Prompts of different lengths share one batch: the common prefix length is
prefilled in one call, then every sequence advances one position per step, fed its own next prompt
byte while it has one and its last sampled token after (so all sequences stay at the same
position, and each starts sampling right after its own prompt). Every prompt is preceded by the
end-of-sequence id, the document separator the model saw in training, so an empty prompt works.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from dsjax.train import UsageError, checkpoint


def load_model(out: str):
    """Builds the model of run directory ``out`` and restores its newest checkpoint.

    Returns:
        ``(model, step)``; the model has the dense routed experts (one device needs no EP).

    Raises:
        UsageError: no ``config.json`` or no complete checkpoint in ``out``.
    """
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from dsjax.nn.config import DeepSeekV3Config  # pylint: disable=import-outside-toplevel
    from dsjax.nn.model import DeepSeekV3  # pylint: disable=import-outside-toplevel

    conf = os.path.join(out, "config.json")
    if not os.path.exists(conf):
        raise UsageError(f"--ckpt: no training run in {out} (config.json missing; train first: "
                         f"dsjax train --out {out})")
    path = checkpoint.latest_checkpoint(out)
    with open(conf) as f:
        fields = json.load(f)["model"]
    known = {f.name for f in dataclasses.fields(DeepSeekV3Config)}
    mcfg = DeepSeekV3Config(**{k: v for k, v in fields.items() if k in known})
    model = DeepSeekV3(mcfg, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, checkpoint.restore(path, "model", nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model, int(checkpoint.read_run_info(path)["step"])


def generate_tokens(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                    seed: int = 0, eos_id: int | None = None, page_block_size: int = 64,
                    implementation: str = "auto") -> list[list[int]]:
    """Generates ``max_new_tokens`` tokens after each prompt (stopping a sequence at ``eos_id``).

    Args:
        model: a :class:`dsjax.nn.model.DeepSeekV3`.
        prompts: B non-empty token-id lists, of any lengths.
        max_new_tokens: tokens to sample per prompt (>= 1).
        temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
        seed: sampling seed.
        eos_id: a sequence's output ends before the first sampled ``eos_id`` (None: never).
        page_block_size: tokens per cache page.
        implementation: FlashMLA implementation (``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``).

    Returns:
        B lists of generated token ids (without the prompt).
    """
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("generate: every prompt must hold at least one token")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: expected a positive integer, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"--temperature: expected >= 0, got {temperature}")
    b = len(prompts)
    lens = np.array([len(p) for p in prompts])
    lmin, total = int(lens.min()), int(lens.max()) + max_new_tokens
    # Row b holds its prompt then its samples; position p of every row is fed at step p.
    seq = np.zeros((b, total), np.int32)
    for i, p in enumerate(prompts):
        seq[i, :len(p)] = p
    caches = model.init_caches(b, total, page_block_size=page_block_size, dtype=jnp.float32)
    step = nnx.jit(lambda m, t, p, c: m.decode(t, p, c, implementation=implementation))
    key = jax.random.PRNGKey(seed)

    def pick(logits: jax.Array, key: jax.Array) -> np.ndarray:
        if temperature == 0:
            return np.asarray(jnp.argmax(logits, axis=-1))
        return np.asarray(jax.random.categorical(key, logits / temperature, axis=-1))

    pos = np.broadcast_to(np.arange(lmin, dtype=np.int32), (b, lmin))
    logits, caches = step(model, jnp.asarray(seq[:, :lmin]), jnp.asarray(pos), caches)
    last = logits[:, -1]
    for p in range(lmin, total):
        key, sub = jax.random.split(key)
        sampled = pick(last, sub)
        fresh = p >= lens  # rows whose prompt is consumed take their sample
        seq[fresh, p] = sampled[fresh]
        if p + 1 < total:
            logits, caches = step(model, jnp.asarray(seq[:, p:p + 1]),
                                  jnp.full((b, 1), p, jnp.int32), caches)
            last = logits[:, -1]
    out = []
    for i in range(b):
        gen = seq[i, lens[i]:lens[i] + max_new_tokens].tolist()
        if eos_id is not None and eos_id in gen:
            gen = gen[:gen.index(eos_id)]
        out.append(gen)
    return out


def generate(out: str, prompts: Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, implementation: str = "auto") -> list[str]:
    """Text continuations of ``prompts`` from the newest checkpoint of run ``out`` (byte-level
    tokens; every prompt starts after an end-of-sequence token)."""
    from dsjax.io import BYTE_EOS_ID, byte_tokenize  # pylint: disable=import-outside-toplevel

    if not prompts:
        raise UsageError("generate: give at least one --prompt")
    if max_new_tokens < 1:  # checked again below; here so that it fails before any loading
        raise UsageError(f"--max-new-tokens: expected a positive integer, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"--temperature: expected >= 0, got {temperature}")
    model, _ = load_model(out)
    ids = [[BYTE_EOS_ID] + byte_tokenize(p).tolist() for p in prompts]
    gen = generate_tokens(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                          eos_id=BYTE_EOS_ID, implementation=implementation)
    # Bytes above 255 other than EOS cannot occur with the byte vocabulary (257); guard anyway.
    return [bytes(t for t in g if t < 256).decode("utf-8", errors="replace") for g in gen]

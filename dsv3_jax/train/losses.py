"""Training losses in float32: next-token CE, the MTP loss (eq. 24-25), the sequence-wise balance loss (eq. 17-20).

Letters: d MTP depth, b batch, t position, v vocab, l MoE layer, e routed expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] in float32: logits [..., v], targets int [...] -> [...]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(mean CE over counted tokens f32 [], number of counted tokens int32 []).

    logits [b, t, v], targets int [b, t], mask bool [b, t] (None: every token counts).
    """
    nll = token_nll(logits, targets)
    valid = jnp.ones(nll.shape, bool) if mask is None else mask.astype(bool)
    n_tokens = jnp.sum(valid, dtype=jnp.int32)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(n_tokens, 1), n_tokens


def mtp_loss(mtp_logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Unweighted MTP loss (1/D) sum_k L^k_MTP (eq. 25 without lambda; the trainer multiplies by lambda), f32 [].

    mtp_logits [d, b, t, v]: depth k (1-based) at position i predicts tokens[:, i + 1 + k], which exists for
    i < t - k only; the last k positions are ignored. tokens int [b, t + 1] is the packed sequence whose first
    t tokens were the model's input. mask bool [b, t] optional, aligned with the main targets tokens[:, 1:]
    (depth k uses mask[:, k:]). L^k_MTP (eq. 24) is the mean CE over depth k's counted predictions (the paper
    writes 1/T for the T - k terms: a factor (T - k) / T away, 0.99976 at T = 4096, k = 1).
    """
    depth, _, t, _ = mtp_logits.shape
    b = tokens.shape[0]
    main_mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
    targets, valid = [], []
    for k in range(1, depth + 1):                                     # static: D is a config constant
        targets.append(jnp.pad(tokens[:, 1 + k:], ((0, 0), (0, k))))                # [b, t]: t_{i+1+k}
        valid.append(jnp.pad(main_mask[:, k:], ((0, 0), (0, k))))                    # False where none
    nll = token_nll(mtp_logits, jnp.stack(targets))                                  # [d, b, t]
    valid = jnp.stack(valid)
    per_depth = jnp.sum(jnp.where(valid, nll, 0.0), axis=(1, 2)) / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1)
    return jnp.mean(per_depth)


def sequence_balance_loss(counts: jax.Array, mean_probs: jax.Array, top_k: int, seq_len: int) -> jax.Array:
    """Sequence-wise balance loss without alpha (eq. 17-20), summed over MoE layers, averaged over sequences.

    counts [l, b, e]: tokens of sequence b whose top-K includes expert e; mean_probs [l, b, e]: mean over the
    sequence's tokens of s'_{e,t} = s_{e,t} / sum_j s_{j,t} (eq. 19-20). f_e = N_r / (K_r T) * counts (eq. 18);
    loss = sum_l mean_b sum_e f_e P_e (eq. 17). Gradients flow through mean_probs only.
    """
    n_routed = counts.shape[-1]
    f = jax.lax.stop_gradient(counts.astype(jnp.float32)) * (n_routed / (top_k * seq_len))
    per_sequence = jnp.sum(f * mean_probs.astype(jnp.float32), axis=-1)            # [l, b]
    return jnp.sum(jnp.mean(per_sequence, axis=-1))

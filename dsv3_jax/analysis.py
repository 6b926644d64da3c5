"""Looking inside a model: per-token routing, MLA cache sizes, absorbed attention, token kinds of Python text.

The model returns per-sequence expert counts only (`ModelOutput.moe`). `routing_trace` re-runs the decoder
layer by layer — each scanned layer's parameters sliced out and applied as one `DecoderLayer` with Flax's
`capture_intermediates` — and routes every token again with `dsv3_jax.model.moe.route`, so what it reports is
what the model computed. `absorbed_attention` rebuilds MLA's decode-time form (W_UK folded into the query,
W_UV applied after the softmax, attention against the cached latent) from one layer's attention parameters.
`load_model` and `bias_history` read what `dsv3-train` and `save_hf` write.

Letters in einsum strings: b batch, s query position, t key position, h head, d head dim, c latent
(kv_lora_rank), r rope dim, e embed.
"""

from __future__ import annotations

import functools
import io
import keyword
import tokenize
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig, load_config
from dsv3_jax.data import Tokenizer, load_tokenizer
from dsv3_jax.model.functional import Params, apply, init_params
from dsv3_jax.model.mla import MLA, causal_mask
from dsv3_jax.model.moe import route
from dsv3_jax.model.rope import apply_rope, rope_angles
from dsv3_jax.model.transformer import DecoderLayer
from dsv3_jax.train.balance import BIAS_NAME

# ----------------------------------------------------------------------------------------------- layers


def layer_params(cfg: ModelConfig, params: Params, layer: int) -> Params:
    """The parameters of decoder layer `layer` (0-based over all num_hidden_layers), sliced out of its scan stack."""
    if not 0 <= layer < cfg.num_hidden_layers:
        raise ValueError(f"layer {layer} is outside the model's {cfg.num_hidden_layers} layers")
    stack, index = ("dense_layers", layer) if layer < cfg.n_dense_layers else ("moe_layers", layer - cfg.n_dense_layers)
    return jax.tree_util.tree_map(lambda leaf: leaf[index], params[stack])


def _positions(tokens: jnp.ndarray) -> jnp.ndarray:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


# ---------------------------------------------------------------------------------------------- routing


class RoutingTrace(NamedTuple):
    """Per-token routing of the main MoE stack (L = cfg.n_moe_layers; the MTP module is not traced).

    experts [L, B, T, K] int32: the experts the model chose (biased affinities, group-limited, eq. 16).
    weights [L, B, T, K] f32: their combine weights (unbiased affinities, normalized, times the scaling factor).
    scores [L, B, T, E] f32: the affinities s (eq. 15), without the balancing bias.
    plain_experts [L, B, T, K] int32: top-k of the biased affinities over all experts, no group limit.
    shared_norm, routed_norm [L, B, T] f32: L2 norm of the shared experts' output and of the routed experts'
        weighted sum (the MoE output minus the shared part) for each token.
    """

    experts: jnp.ndarray
    weights: jnp.ndarray
    scores: jnp.ndarray
    plain_experts: jnp.ndarray
    shared_norm: jnp.ndarray
    routed_norm: jnp.ndarray

    def counts(self) -> np.ndarray:
        """Tokens routed to each expert per sequence: [L, B, E] (equals ModelOutput.moe["moe_layers"].counts)."""
        n_experts = self.scores.shape[-1]
        experts = np.asarray(self.experts)
        one_hot = experts[..., None] == np.arange(n_experts)
        return one_hot.sum(axis=(2, 3))

    def group_limit_changed(self) -> np.ndarray:
        """[L, B, T] bool: the group limit made the chosen set differ from plain top-k."""
        return np.any(np.sort(np.asarray(self.experts), -1) != np.sort(np.asarray(self.plain_experts), -1), -1)


def _captured(intermediates: dict[str, Any], *path: str) -> jnp.ndarray:
    node = intermediates
    for name in path:
        node = node[name]
    return node["__call__"][0]


def _capture_moe_parts(module: Any, method_name: str) -> bool:
    return method_name == "__call__" and module.name in ("post_attention_layernorm", "mlp", "shared_experts")


@functools.partial(jax.jit, static_argnums=0)
def routing_trace(cfg: ModelConfig, params: Params, tokens: jnp.ndarray) -> RoutingTrace:
    """Route tokens int32 [batch, seq] through the model and record every MoE layer's choice per token.

    Layers run one at a time instead of as one scan: in float32 the choices are the model's exactly; in
    bfloat16 XLA may round differently and resolve a near-tie between two experts the other way.
    """
    if not cfg.n_moe_layers:
        raise ValueError("the config has no MoE layer to trace")
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = _positions(tokens)
    cos, sin = rope_angles(cfg, positions)
    x = jnp.take(params["embed_tokens"], tokens, axis=0).astype(cfg.dtype)
    no_groups = cfg.replace(n_group=1, topk_group=1)
    traced = []
    for layer in range(cfg.num_hidden_layers):
        variables = {"params": layer_params(cfg, params, layer)}
        if layer < cfg.n_dense_layers:
            x, _ = DecoderLayer(cfg, False).apply(variables, x, cos, sin, positions)
            continue
        (x, _), state = DecoderLayer(cfg, True).apply(variables, x, cos, sin, positions,
                                                      capture_intermediates=_capture_moe_parts,
                                                      mutable=["intermediates"])
        inter = state["intermediates"]
        h = _captured(inter, "post_attention_layernorm")                      # [B, T, D], the MoE input
        y = _captured(inter, "mlp")[0].astype(jnp.float32)                     # shared + routed
        shared = (_captured(inter, "mlp", "shared_experts").astype(jnp.float32) if cfg.n_shared_experts
                  else jnp.zeros_like(y))
        mlp = variables["params"]["mlp"]
        b, t, d = h.shape
        logits = jnp.dot(h.reshape(b * t, d).astype(jnp.float32), mlp["gate"])
        bias = mlp.get(BIAS_NAME)
        chosen, plain = route(cfg, logits, bias), route(no_groups, logits, bias)
        k = cfg.num_experts_per_tok
        traced.append(RoutingTrace(
            experts=chosen.experts.reshape(b, t, k), weights=chosen.weights.reshape(b, t, k),
            scores=chosen.scores.reshape(b, t, -1), plain_experts=plain.experts.reshape(b, t, k),
            shared_norm=jnp.linalg.norm(shared, axis=-1), routed_norm=jnp.linalg.norm(y - shared, axis=-1)))
    return RoutingTrace(*(jnp.stack(field) for field in zip(*traced, strict=True)))


def model_counts(cfg: ModelConfig, params: Params, tokens: jnp.ndarray) -> np.ndarray:
    """The model's own per-sequence expert counts of the main MoE stack, [L, B, E] (to check a trace against)."""
    return np.asarray(apply(cfg, params, jnp.asarray(tokens, jnp.int32), with_mtp=False).moe["moe_layers"].counts)


# -------------------------------------------------------------------------------------------- attention


class CacheSize(NamedTuple):
    """KV-cache size per token: values_* cached per token per layer, bytes_* per token over all `layers`."""

    layers: int
    values_mla: int
    values_mha: int
    bytes_mla: int
    bytes_mha: int


def mla_cache_bytes(cfg: ModelConfig, bytes_per_value: int = 2) -> CacheSize:
    """MLA caches the latent c_kv and the shared rope key: kv_lora_rank + qk_rope_head_dim values per token per layer
    (576 for DeepSeek-V3). Multi-head attention with the same heads caches every head's key (qk_nope + qk_rope dims)
    and value: num_attention_heads * (qk_head_dim + v_head_dim). MTP modules are not counted."""
    mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    layers = cfg.num_hidden_layers
    return CacheSize(layers, mla, mha, mla * layers * bytes_per_value, mha * layers * bytes_per_value)


def _capture_mla_parts(module: Any, method_name: str) -> bool:
    return method_name in ("queries", "latent_kv")


@functools.partial(jax.jit, static_argnums=0)
def naive_attention(cfg: ModelConfig, attn_params: Params, x: jnp.ndarray) -> jnp.ndarray:
    """The model's own MLA (keys and values expanded per head, eq. 1-11): x [b, s, e] -> [b, s, e]."""
    positions = _positions(x[..., 0])
    cos, sin = rope_angles(cfg, positions)
    return MLA(cfg).apply({"params": attn_params}, x, cos, sin, positions)


@functools.partial(jax.jit, static_argnums=0)
def absorbed_attention(cfg: ModelConfig, attn_params: Params, x: jnp.ndarray) -> jnp.ndarray:
    """MLA with W_UK absorbed into the query and W_UV applied after attention: x [b, s, e] -> [b, s, e] (float32).

    q_nope W_UK gives a kv_lora_rank-wide query per head (512 for DeepSeek-V3) scored directly against the
    cached latent c_kv; the rope parts score as usual; out = (softmax x c_kv) W_UV, then o_proj. No per-head
    key or value is ever formed, which is what decoding from a latent cache computes.
    """
    positions = _positions(x[..., 0])
    cos, sin = rope_angles(cfg, positions)
    _, state = MLA(cfg).apply({"params": attn_params}, x, cos, sin, positions,
                              capture_intermediates=_capture_mla_parts, mutable=["intermediates"])
    (q_nope, q_rope), = state["intermediates"]["queries"]
    (c_kv, k_rope), = state["intermediates"]["latent_kv"]
    q_rope = apply_rope(q_rope, cos, sin, cfg.rope_interleave).astype(jnp.float32)
    k_rope = apply_rope(k_rope[:, :, None, :], cos, sin, cfg.rope_interleave)[:, :, 0, :].astype(jnp.float32)
    w_ukv = attn_params["kv_b_proj"]["kernel"].astype(jnp.float32)            # [c, h, nope + v]
    w_uk, w_uv = w_ukv[..., :cfg.qk_nope_head_dim], w_ukv[..., cfg.qk_nope_head_dim:]
    c_kv = c_kv.astype(jnp.float32)
    q_latent = jnp.einsum("bshd,chd->bshc", q_nope.astype(jnp.float32), w_uk)  # the absorbed query
    scores = jnp.einsum("bshc,btc->bhst", q_latent, c_kv) + jnp.einsum("bshr,btr->bhst", q_rope, k_rope)
    scores = jnp.where(causal_mask(positions, positions), scores * cfg.softmax_scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out_latent = jnp.einsum("bhst,btc->bshc", probs, c_kv)
    out = jnp.einsum("bshc,chd->bshd", out_latent, w_uv)
    return jnp.einsum("bshd,hde->bse", out, attn_params["o_proj"]["kernel"].astype(jnp.float32))


# ------------------------------------------------------------------------------------------- token kinds

TOKEN_KINDS = ("comment", "docstring", "string", "number", "keyword", "name", "operator", "whitespace")
_STRING_TYPES = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                                     if hasattr(tokenize, n)}
_STATEMENT_START = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}


def _char_kinds(text: str) -> np.ndarray:
    """Kind index (into TOKEN_KINDS) of every character of Python source `text`; whitespace where unknown."""
    kinds = np.full(len(text), TOKEN_KINDS.index("whitespace"), np.int32)
    line_starts = np.cumsum([0] + [len(line) for line in text.splitlines(keepends=True)])
    offset = lambda row_col: int(line_starts[row_col[0] - 1]) + row_col[1]
    previous = tokenize.ENCODING
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                kind = "comment"
            elif tok.type in _STRING_TYPES:
                kind = "docstring" if tok.type == tokenize.STRING and previous in _STATEMENT_START else "string"
            elif tok.type == tokenize.NUMBER:
                kind = "number"
            elif tok.type == tokenize.NAME:
                kind = "keyword" if keyword.iskeyword(tok.string) else "name"
            elif tok.type == tokenize.OP:
                kind = "operator"
            else:
                kind = None
            if kind is not None:
                kinds[offset(tok.start):offset(tok.end)] = TOKEN_KINDS.index(kind)
            if tok.type not in (tokenize.COMMENT, tokenize.NL):
                previous = tok.type
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # keep the kinds found so far; the rest stays "whitespace"
    return kinds


def python_token_kinds(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [T] of Python source `text` and each token's kind [T] (index into TOKEN_KINDS).

    A token takes the kind of its first non-space character (Python's own `tokenize` decides: comment, string,
    docstring = a string that is a statement of its own, number, keyword, name, operator); all-space tokens are
    "whitespace".
    """
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    chars = _char_kinds(text)
    kinds = np.empty(len(encoding.ids), np.int32)
    for i, (start, end) in enumerate(encoding.offsets):
        span = text[start:end]
        first = start + (len(span) - len(span.lstrip())) if span.strip() else None
        kinds[i] = chars[first] if first is not None and first < len(chars) else TOKEN_KINDS.index("whitespace")
    return np.asarray(encoding.ids, np.int32), kinds


# ------------------------------------------------------------------------------------------------ loading


def load_model(path: str | Path, step: int | None = None, dtype: str = "float32",
               ) -> tuple[ModelConfig, Params, Tokenizer | None]:
    """(config, params, tokenizer or None) from an HF directory (`save_hf` / a download) or a `dsv3-train` workdir.

    A workdir (config.json + checkpoints/) gives the params of checkpoint `step` (default: the latest) and the
    tokenizer cached in <workdir>/tokenizer; an HF directory gives `load_hf`'s params and its tokenizer.json when
    present. `dtype` is the execution dtype of the returned config.
    """
    path = Path(path)
    if (path / "checkpoints").is_dir():
        cfg = load_config(path, dtype=dtype)
        with _TrainCheckpoints(path, cfg) as ckpt:
            step = ckpt.steps[-1] if step is None else step
            params = ckpt.params(step)
        tokenizer_dir = path / "tokenizer"
    else:
        from dsv3_jax.convert.hf import load_hf  # safetensors: imported on first use

        cfg, params = load_hf(path)
        cfg = cfg.replace(dtype=dtype)
        tokenizer_dir = path
    tokenizer = load_tokenizer(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").is_file() else None
    return cfg, params, tokenizer


def bias_history(workdir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Routing biases of every kept checkpoint of a `dsv3-train` workdir: steps [S] and biases [S, L_moe, E]."""
    workdir = Path(workdir)
    with _TrainCheckpoints(workdir, load_config(workdir)) as ckpt:
        biases = [np.asarray(ckpt.params(s)["moe_layers"]["mlp"][BIAS_NAME]) for s in ckpt.steps]
        return np.asarray(ckpt.steps), np.stack(biases)


class _TrainCheckpoints:
    """The checkpoints of a `dsv3-train` workdir, restored as params (the optimizer state is read and dropped)."""

    def __init__(self, workdir: Path, cfg: ModelConfig):
        from dsv3_jax.train.checkpoint import Checkpointer  # orbax is slow to import: only on first use
        from dsv3_jax.train.optimizer import make_optimizer
        from dsv3_jax.train.recipe import load_recipe
        from dsv3_jax.train.step import init_state

        optimizer = make_optimizer(load_recipe(workdir / "recipe.json"))
        self.cfg = cfg
        self.abstract = jax.eval_shape(lambda key: init_state(init_params(cfg, key), optimizer), jax.random.key(0))
        self.checkpointer = Checkpointer(workdir / "checkpoints", async_save=False)
        self.steps = sorted(self.checkpointer.all_steps())
        if not self.steps:
            raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint")

    def params(self, step: int) -> Params:
        state, _, _ = self.checkpointer.restore(step, self.abstract, self.cfg)
        return state.params

    def __enter__(self) -> _TrainCheckpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.checkpointer.close()

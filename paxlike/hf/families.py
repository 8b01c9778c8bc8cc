"""Hugging Face checkpoint formats (GPT-2, LLaMA, BLOOM, Mixtral) as tables of config and tensor rules."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from paxlike.errors import UserError

REQUIRED = object()  # a ConfigRule default: config.json must hold the key


@dataclasses.dataclass(frozen=True)
class ConfigRule:
    """A ModelConfig field and the config.json key(s) that hold it.

    `keys[0]` is written; later keys are other spellings accepted on reading; "a.b" is key b
    of the object under key a. No keys: the field is derived (by `default`) and not written.
    `default` is a value, or a function of the fields read so far, used when no key is
    present (or it is null). `names` pairs config.json values with ModelConfig values where
    the two spell them differently; with names, other values are refused. `read` / `write`
    turn a config.json value into the ModelConfig value and back where no table can (a
    value that does not survive write-then-read is refused by the round trip check).
    """

    field: str
    keys: tuple[str, ...] = ()
    default: Any = REQUIRED
    names: tuple[tuple[Any, Any], ...] = ()
    read: Callable[[Any], Any] | None = None
    write: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Setting:
    """A config.json value the mapping relies on: a checkpoint that sets it otherwise is refused."""

    key: str
    value: Any
    write: bool = True  # False: only checked (an older spelling of something written elsewhere)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One Hugging Face tensor <-> one or more paxlike parameters, by axis patterns.

    Axis letters: v vocabulary, p position-table rows, d d_model, n query heads, k K/V heads,
    h head_dim, f d_ff, e experts, s which of `params` (a fused tensor such as query/key/value).
    A parenthesised group is one tensor axis holding the product, its first letter major.
    "{i}" in `name` marks a per-layer tensor; paxlike stacks those on a leading layers axis.
    "{j}" marks a per-expert tensor; paxlike stacks those on an experts axis after the layers
    axis. `axes` names neither stacking axis.
    """

    name: str
    hf_axes: str
    params: tuple[str, ...]
    axes: str


@dataclasses.dataclass(frozen=True)
class Family:
    """How one family's Hugging Face checkpoints map onto ModelConfig and the parameter tree."""

    name: str
    model_type: str  # config.json's model_type
    architecture: str  # the transformers class written into config.json
    prefix: str  # base-model prefix of tensor names (some checkpoints omit it)
    model: dict[str, Any]  # ModelConfig values every checkpoint of the family has
    config: tuple[ConfigRule, ...]
    settings: tuple[Setting, ...]
    tensors: tuple[TensorRule, ...]
    ignore: tuple[str, ...] = ()  # regexes: tensors with no paxlike counterpart (buffers, tied copies)


def _heads(fields: dict) -> int:
    return fields["num_heads"]


def _head_dim(fields: dict) -> int:
    return fields["d_model"] // fields["num_heads"]


def _four_d(fields: dict) -> int:
    return 4 * fields["d_model"]


def _layer_norms(prefix: str, pairs: dict[str, str]) -> tuple[TensorRule, ...]:
    """LayerNorm weight/bias rules: HF norm name -> paxlike norm module path."""
    return tuple(
        TensorRule(f"{prefix}{hf}.{hf_leaf}", "d", (f"{pax}/{pax_leaf}",), "d")
        for hf, pax in pairs.items()
        for hf_leaf, pax_leaf in (("weight", "scale"), ("bias", "bias")))


def _linear(name: str, hf_axes: str, params: tuple[str, ...], axes: str,
            bias_hf: str, bias_axes: str) -> tuple[TensorRule, ...]:
    """A projection's weight rule and its bias rule (used only where the model has biases)."""
    return (TensorRule(f"{name}.weight", hf_axes, tuple(f"{p}/kernel" for p in params), axes),
            TensorRule(f"{name}.bias", bias_hf, tuple(f"{p}/bias" for p in params), bias_axes))


_QKV = ("layers/attention/query", "layers/attention/key", "layers/attention/value")
# The dense families attend densely in every layer (their formats hold no band; Mixtral's
# holds one band for all layers).
_SERIAL_PRE_NORM = {"block": "serial", "norm_placement": "pre", "residual_scale": 1.0,
                    "final_norm": True, "logits_rsqrt_d_model": False, "attention_windows": (0,)}
# The dense families' MLP is one MLP: a model with experts is not theirs.
_DENSE = {"num_experts": 0}
_LM_HEAD = TensorRule("lm_head.weight", "v d", ("output_proj/kernel",), "d v")
_EMBED_STD = ConfigRule("embed_init_std", ("initializer_range",), 0.02)

GPT2 = Family(
    name="gpt2", model_type="gpt2", architecture="GPT2LMHeadModel", prefix="transformer.",
    # GPT-2 attends densely in every layer (GPT-3's banded layers have no HF format).
    model={**_SERIAL_PRE_NORM, **_DENSE, "norm": "layernorm", "norm_bias": True,
           "use_bias": True, "position": "learned", "position_offset": 0,
           "embedding_norm": False},
    config=(
        ConfigRule("vocab_size", ("vocab_size",)),
        ConfigRule("d_model", ("n_embd", "hidden_size")),
        ConfigRule("num_layers", ("n_layer", "num_hidden_layers")),
        ConfigRule("num_heads", ("n_head", "num_attention_heads")),
        ConfigRule("num_kv_heads", default=_heads),
        ConfigRule("head_dim", default=_head_dim),
        ConfigRule("d_ff", ("n_inner",), _four_d),
        ConfigRule("max_seq_len", ("n_positions", "max_position_embeddings")),
        ConfigRule("norm_epsilon", ("layer_norm_epsilon",), 1e-5),
        # gelu_new is GPT-2's tanh approximation; "gelu" is the exact erf form.
        ConfigRule("mlp_activation", ("activation_function",), "gelu_new",
                   (("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                    ("gelu", "gelu"), ("relu", "relu"), ("silu", "silu"))),
        ConfigRule("tie_embeddings", ("tie_word_embeddings",), True),
        _EMBED_STD,
    ),
    settings=(Setting("scale_attn_weights", True), Setting("scale_attn_by_inverse_layer_idx", False),
              Setting("add_cross_attention", False)),
    tensors=(
        TensorRule("transformer.wte.weight", "v d", ("token_embed/embedding",), "v d"),
        TensorRule("transformer.wpe.weight", "p d", ("position_embed/embedding",), "p d"),
        # Conv1D stores weights as (in, out); c_attn's output is [q | k | v], each head-major.
        *_linear("transformer.h.{i}.attn.c_attn", "d (s n h)", _QKV, "d n h", "(s n h)", "n h"),
        *_linear("transformer.h.{i}.attn.c_proj", "(n h) d", ("layers/attention/out",), "n h d",
                 "d", "d"),
        *_linear("transformer.h.{i}.mlp.c_fc", "d f", ("layers/mlp/wi_gate",), "d f", "f", "f"),
        *_linear("transformer.h.{i}.mlp.c_proj", "f d", ("layers/mlp/wo",), "f d", "d", "d"),
        *_layer_norms("transformer.", {"h.{i}.ln_1": "layers/attention_norm",
                                       "h.{i}.ln_2": "layers/mlp_norm", "ln_f": "final_norm"}),
        _LM_HEAD,
    ),
    # The causal-mask buffers older checkpoints stored, and a tied head saved anyway.
    ignore=(r"\.attn\.(masked_)?bias$", r"^lm_head\.weight$"),
)


def _llama_attention(layer: str) -> tuple[TensorRule, ...]:
    """LLaMA's attention tensors of every layer, onto the scanned layer at `layer`."""
    qkv = tuple(f"{layer}/attention/{p}" for p in ("query", "key", "value"))
    hf = "model.layers.{i}"
    # torch Linear stores weights as (out, in).
    return (
        *_linear(f"{hf}.self_attn.q_proj", "(n h) d", (qkv[0],), "d n h", "(n h)", "n h"),
        *_linear(f"{hf}.self_attn.k_proj", "(k h) d", (qkv[1],), "d k h", "(k h)", "k h"),
        *_linear(f"{hf}.self_attn.v_proj", "(k h) d", (qkv[2],), "d k h", "(k h)", "k h"),
        *_linear(f"{hf}.self_attn.o_proj", "d (n h)", (f"{layer}/attention/out",), "n h d",
                 "d", "d"),
    )


def _llama_norms(layer: str) -> tuple[TensorRule, ...]:
    """LLaMA's two RMSNorm scales of every layer, onto the scanned layer at `layer`."""
    hf = "model.layers.{i}"
    return (
        TensorRule(f"{hf}.input_layernorm.weight", "d", (f"{layer}/attention_norm/scale",), "d"),
        TensorRule(f"{hf}.post_attention_layernorm.weight", "d", (f"{layer}/mlp_norm/scale",),
                   "d"),
    )


_LLAMA_MODEL = {**_SERIAL_PRE_NORM, "norm": "rmsnorm", "norm_bias": False,
                "mlp_activation": "swiglu", "position": "rope", "embedding_norm": False}
_LLAMA_SHAPE_CONFIG = (
    ConfigRule("vocab_size", ("vocab_size",)),
    ConfigRule("d_model", ("hidden_size",)),
    ConfigRule("num_layers", ("num_hidden_layers",)),
    ConfigRule("num_heads", ("num_attention_heads",)),
    ConfigRule("num_kv_heads", ("num_key_value_heads",), _heads),
    ConfigRule("head_dim", ("head_dim",), _head_dim),
    ConfigRule("d_ff", ("intermediate_size",)),
)
_LLAMA_SETTINGS = (Setting("hidden_act", "silu"), Setting("rope_parameters.rope_type", "default"),
                   Setting("rope_scaling", None, write=False))
_LLAMA_EMBED = TensorRule("model.embed_tokens.weight", "v d", ("token_embed/embedding",), "v d")
_LLAMA_HEAD = (TensorRule("model.norm.weight", "d", ("final_norm/scale",), "d"), _LM_HEAD)
_LLAMA_IGNORE = (r"\.rotary_emb\.inv_freq$", r"^lm_head\.weight$")

LLAMA = Family(
    name="llama", model_type="llama", architecture="LlamaForCausalLM", prefix="model.",
    model={**_LLAMA_MODEL, **_DENSE},
    config=(
        *_LLAMA_SHAPE_CONFIG,
        ConfigRule("max_seq_len", ("max_position_embeddings",), 2048),
        ConfigRule("norm_epsilon", ("rms_norm_eps",), 1e-6),
        ConfigRule("rope_max_wavelength", ("rope_parameters.rope_theta", "rope_theta"), 10_000.0),
        ConfigRule("tie_embeddings", ("tie_word_embeddings",), False),
        # paxlike has one bias switch; checkpoints that set these two differently are refused.
        ConfigRule("use_bias", ("attention_bias",), False),
        ConfigRule("use_bias", ("mlp_bias",), False),
        _EMBED_STD,
    ),
    settings=_LLAMA_SETTINGS,
    tensors=(
        _LLAMA_EMBED,
        *_llama_attention("layers"),
        *_linear("model.layers.{i}.mlp.gate_proj", "f d", ("layers/mlp/wi_gate",), "d f", "f", "f"),
        *_linear("model.layers.{i}.mlp.up_proj", "f d", ("layers/mlp/wi_up",), "d f", "f", "f"),
        *_linear("model.layers.{i}.mlp.down_proj", "d f", ("layers/mlp/wo",), "f d", "d", "d"),
        *_llama_norms("layers"),
        *_LLAMA_HEAD,
    ),
    ignore=_LLAMA_IGNORE,
)

BLOOM = Family(
    name="bloom", model_type="bloom", architecture="BloomForCausalLM", prefix="transformer.",
    model={**_SERIAL_PRE_NORM, **_DENSE, "norm": "layernorm", "norm_bias": True,
           "use_bias": True, "mlp_activation": "gelu_tanh", "position": "alibi",
           "embedding_norm": True},
    config=(
        ConfigRule("vocab_size", ("vocab_size",)),
        ConfigRule("d_model", ("hidden_size", "n_embed")),
        ConfigRule("num_layers", ("n_layer", "num_hidden_layers")),
        ConfigRule("num_heads", ("n_head", "num_attention_heads")),
        ConfigRule("num_kv_heads", default=_heads),
        ConfigRule("head_dim", default=_head_dim),
        ConfigRule("d_ff", default=_four_d),
        # ALiBi has no table; this only bounds SEQ_LEN (BLOOM trained on 2048).
        ConfigRule("max_seq_len", ("seq_length",), 2048),
        ConfigRule("norm_epsilon", ("layer_norm_epsilon",), 1e-5),
        ConfigRule("tie_embeddings", ("tie_word_embeddings",), True),
        _EMBED_STD,
    ),
    settings=(Setting("apply_residual_connection_post_layernorm", False),),
    tensors=(
        TensorRule("transformer.word_embeddings.weight", "v d", ("token_embed/embedding",), "v d"),
        # The fused projection's output is laid out per head: (head, q/k/v, head_dim).
        *_linear("transformer.h.{i}.self_attention.query_key_value", "(n s h) d", _QKV, "d n h",
                 "(n s h)", "n h"),
        *_linear("transformer.h.{i}.self_attention.dense", "d (n h)", ("layers/attention/out",),
                 "n h d", "d", "d"),
        *_linear("transformer.h.{i}.mlp.dense_h_to_4h", "f d", ("layers/mlp/wi_gate",), "d f",
                 "f", "f"),
        *_linear("transformer.h.{i}.mlp.dense_4h_to_h", "d f", ("layers/mlp/wo",), "f d", "d", "d"),
        *_layer_norms("transformer.", {"word_embeddings_layernorm": "embedding_norm",
                                       "h.{i}.input_layernorm": "layers/attention_norm",
                                       "h.{i}.post_attention_layernorm": "layers/mlp_norm",
                                       "ln_f": "final_norm"}),
        _LM_HEAD,
    ),
    ignore=(r"^lm_head\.weight$",),
)


def _some_experts(n: int) -> int:
    """num_local_experts, refused at 0 (a dense model is a LLaMA)."""
    if n < 2:
        raise UserError(f"num_local_experts = {n}: a Mixtral model has 2 or more experts per "
                        "layer; convert a dense model with --family llama")
    return n


def _two_or_more(k: int) -> int:
    """num_experts_per_tok, refused below 2 (where Mixtral's renormalised gate is always 1)."""
    if k < 2:
        raise UserError(f"num_experts_per_tok = {k}: Mixtral renormalises a single chosen gate "
                        "to 1, while paxlike's switch router keeps its probability; only 2 or "
                        "more experts per token convert")
    return k


# Every layer is sparse, so the scanned stack repeats a group of one layer: layer i of the
# checkpoint is entry i of the "layers/layer_0" parameters' leading axis.
_MIXTRAL_LAYER = "layers/layer_0"
_MIXTRAL_EXPERT = "model.layers.{i}.block_sparse_moe.experts.{j}"

MIXTRAL = Family(
    name="mixtral", model_type="mixtral", architecture="MixtralForCausalLM", prefix="model.",
    # Mixtral's router is paxlike's switch router with k >= 2: a float32 softmax over all
    # experts, the top k, their gates renormalised to sum to 1; every choice is computed.
    model={**{k: v for k, v in _LLAMA_MODEL.items() if k != "attention_windows"},
           "use_bias": False, "moe_every": 1, "router": "switch", "moe_dispatch": "dropless",
           "expert_mlp_activation": None},
    config=(
        *_LLAMA_SHAPE_CONFIG,
        ConfigRule("max_seq_len", ("max_position_embeddings",), 4096 * 32),
        ConfigRule("norm_epsilon", ("rms_norm_eps",), 1e-5),
        ConfigRule("rope_max_wavelength", ("rope_parameters.rope_theta", "rope_theta"), 1e6),
        ConfigRule("tie_embeddings", ("tie_word_embeddings",), False),
        ConfigRule("num_experts", ("num_local_experts",), 8, read=_some_experts),
        ConfigRule("experts_per_token", ("num_experts_per_tok",), 2, read=_two_or_more),
        # Query t sees keys t - w + 1 .. t in both; null is dense attention.
        ConfigRule("attention_windows", ("sliding_window",), (0,), read=lambda w: (w,),
                   write=lambda windows: windows[0] or None),
        _EMBED_STD,
    ),
    settings=(*_LLAMA_SETTINGS,
              # transformers' jitter scales the expert inputs too; paxlike's only the router's.
              Setting("router_jitter_noise", 0.0)),
    tensors=(
        _LLAMA_EMBED,
        *_llama_attention(_MIXTRAL_LAYER),
        TensorRule("model.layers.{i}.block_sparse_moe.gate.weight", "e d",
                   (f"{_MIXTRAL_LAYER}/moe/router/kernel",), "d e"),
        TensorRule(f"{_MIXTRAL_EXPERT}.w1.weight", "f d", (f"{_MIXTRAL_LAYER}/moe/wi_gate/kernel",),
                   "d f"),
        TensorRule(f"{_MIXTRAL_EXPERT}.w3.weight", "f d", (f"{_MIXTRAL_LAYER}/moe/wi_up/kernel",),
                   "d f"),
        TensorRule(f"{_MIXTRAL_EXPERT}.w2.weight", "d f", (f"{_MIXTRAL_LAYER}/moe/wo/kernel",),
                   "f d"),
        *_llama_norms(_MIXTRAL_LAYER),
        *_LLAMA_HEAD,
    ),
    ignore=_LLAMA_IGNORE,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, LLAMA, BLOOM, MIXTRAL)}

# Defaults a converted model trains with: the family gin files' choices.
TRAINING_FIELDS: dict[str, Any] = {"z_loss_weight": 0.0}

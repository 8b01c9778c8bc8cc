"""Typed, gin-configurable description of a decoder-only Transformer; a model family is a binding of these fields."""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp

from paxlike.errors import UserError

_CHOICES = {
    "block": ("parallel", "serial"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp_activation": ("swiglu", "geglu", "gelu", "gelu_tanh", "relu", "silu"),
    "position": ("rope", "rope_2d", "alibi", "learned", "none"),
    "norm_placement": ("pre", "post", "sandwich"),
    "remat_policy": ("auto", "none", "full", "save_dots"),
    "layer_grad_boundary": ("auto", "on", "off"),
    "dtype": ("float32", "bfloat16"),
    "param_dtype": ("float32", "bfloat16"),
    "attention_impl": ("auto", "splash", "cudnn", "blockwise", "reference"),
    "router": ("switch", "gshard", "base", "demix"),
    "moe_dispatch": ("dropping", "dropless"),
    "dense_init": ("fan_in", "xavier_normal"),
}
# Choices per token each router makes: None = any experts_per_token (top-k).
_ROUTER_CHOICES = {"switch": None, "gshard": 2, "base": 1, "demix": 1}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the decoder; defaults are PaLM's architectural choices."""

    vocab_size: int = 256_000
    d_model: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 1  # 1 = multi-query, num_heads = multi-head, in between = grouped
    head_dim: int = 64  # independent of d_model (PaLM 540B: 48 x 256 < 18432)
    d_ff: int = 2048
    block: str = "parallel"  # parallel: x + attn(n(x)) + mlp(n(x)); serial: one residual after another
    # Serial blocks: pre x + f(N(x)); post N(a*x + f(x)) (a = residual_scale; DeepNorm
    # a = (2 * num_layers)^0.5); sandwich x + N'(f(N(x))).
    norm_placement: str = "pre"
    residual_scale: float = 1.0
    # Kernel init of the dense projections: 'fan_in' truncated normal (PaLM) or
    # 'xavier_normal' N(0, 2 / (fan_in + fan_out)) (DeepNet, GLM-130B).
    dense_init: str = "fan_in"
    # DeepNorm's beta (Wang et al. 2022): a gain on the init of the value, attention output
    # and feed-forward kernels; query and key keep gain 1 (dense.DEEPNORM_SCALED).
    deepnorm_beta: float = 1.0
    embedding_norm: bool = False  # a norm right after the token embedding (BLOOM)
    final_norm: bool = True
    norm: str = "layernorm"
    norm_bias: bool = False
    norm_epsilon: float = 1e-6
    mlp_activation: str = "swiglu"
    use_bias: bool = False  # biases on the dense projections
    # 'rope_2d': GLM's 2D rotary positions (attention.apply_rope_2d), half of each head each.
    position: str = "rope"
    rope_max_wavelength: float = 10_000.0
    max_seq_len: int = 2048  # longest sequence the positions support
    position_offset: int = 0  # learned positions: table rows before position 0 (OPT: 2)
    tie_embeddings: bool = True
    logits_rsqrt_d_model: bool = True  # PaLM scales shared-embedding logits by 1/sqrt(d_model)
    embed_init_std: float = 1.0
    z_loss_weight: float = 1e-4
    scan_layers: bool = True  # one compiled layer looped L times: compile time flat in depth
    # Layers per scan iteration. XLA's CPU backend runs a rolled loop well below the speed
    # of straight-line code (see docs/benchmarks.md); unrolling keeps the stacked weights,
    # so checkpoints do not change. 'auto' resolves per platform (for_platform).
    scan_unroll: int | str = "auto"
    # Queries per attention block: each block meets only the keys causality lets it see
    # (see attention.causal_attention); 0 = the whole sequence in one block.
    attention_query_block: int = 128
    # How attention is computed. 'auto' resolves per platform (for_platform): the Pallas
    # splash kernel on TPU, cuDNN's fused attention on GPU, 'blockwise' elsewhere.
    # 'blockwise' is an XLA online softmax over key blocks of `attention_key_block`
    # (temporaries grow with T x block, never T x T); 'reference' materialises the
    # masked scores and is the numerical reference the others are tested against.
    attention_impl: str = "auto"
    attention_key_block: int = 512
    # Attention band per layer, the tuple repeated over the stack: layer i's queries see
    # only the last attention_windows[i % len] keys (themselves included); 0 = dense
    # causal. GPT-3 alternates (0, 256). A banded layer costs O(T x W), not O(T^2).
    attention_windows: tuple[int, ...] = (0,)
    # A prefix LM: each document's prefix (the data's decoder_causal_attention: a prompt,
    # GLM's part A) is attended bidirectionally, in training and at a prompt's prefill.
    bidirectional_prefix: bool = False
    # Sequence positions per chunk of the output projection + cross-entropy: the
    # (batch, T, vocab) float32 logits never exist at once (0 = one chunk).
    loss_chunk: int = 512
    # The embedding table has vocab_size rounded up to a multiple of this (TPU lanes
    # are 128 wide); padded rows never receive probability mass (see losses.py).
    vocab_pad_multiple: int = 128
    # What the backward pass recomputes. 'auto' resolves per platform (for_platform):
    # 'save_dots' on CPU, where recomputing elementwise work beats storing it (measured,
    # docs/benchmarks.md), 'none' elsewhere; set 'full' when activations do not fit.
    remat_policy: str = "auto"
    # Whether the backward pass computes the residual stream's gradient at each layer's
    # input into a buffer of its own (block.grad_boundary). 'auto' turns it on for CPU
    # meshes, where XLA otherwise recomputes the sum of all later layers' gradients
    # inside every consumer (a quarter of a 12-layer CPU step); see for_platform.
    layer_grad_boundary: str = "auto"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters (and their gradients)
    # Mixture of experts (moe.py): every `moe_every`-th layer's MLP becomes `num_experts`
    # copies of it behind a router (0 = dense). Routers: 'switch' top-k (Switch: k = 1),
    # 'gshard' top-2 with the second expert dispatched at random in proportion to its gate,
    # 'base' a balanced assignment in training (BASE layers), greedy top-1 at inference,
    # 'demix' one expert per data domain, chosen by the data (DEMix layers; demix.py).
    num_experts: int = 0
    experts_per_token: int = 1
    moe_every: int = 2  # layers i with (i + 1) % moe_every == 0 are sparse (GLaM: every other)
    router: str = "switch"
    # Expert slots per group = ceil(factor * experts_per_token * group tokens / num_experts);
    # tokens routed past them are dropped (their residual passes through).
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    router_jitter: float = 0.0  # training multiplies the router input by U(1 - j, 1 + j)
    # 'dropping': capacity-bounded einsum dispatch; 'dropless': tokens sorted by expert into
    # ragged matmuls, nothing dropped (one sort over the layer's tokens: no expert parallelism).
    moe_dispatch: str = "dropping"
    moe_group_size: int = 0  # tokens routed together (capacity is per group); 0 = one sequence
    load_balance_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    # The experts' MLP where it differs from the dense layers' (GLaM: GeGLU dense layers,
    # plain GELU experts); None = mlp_activation.
    expert_mlp_activation: str | None = None

    def __post_init__(self):
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                raise UserError(
                    f"ModelConfig.{field} = {value!r} is not supported; choose one of {list(allowed)}"
                )
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "d_ff", "max_seq_len", "attention_key_block",
                      "vocab_pad_multiple"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"ModelConfig.{field} = {value!r}; it must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"ModelConfig.num_heads = {self.num_heads} is not a multiple of num_kv_heads = "
                f"{self.num_kv_heads}; pick K/V heads that divide the query heads"
            )
        if self.block == "parallel" and self.norm_placement != "pre":
            raise UserError("the parallel block is pre-norm only; set norm_placement = 'pre' "
                            "or block = 'serial'")
        if self.scan_unroll != "auto" and (not isinstance(self.scan_unroll, int)
                                           or isinstance(self.scan_unroll, bool)
                                           or self.scan_unroll < 1):
            raise UserError(f"ModelConfig.scan_unroll = {self.scan_unroll!r}; it must be 'auto' "
                            "or a positive int (layers per scan iteration)")
        if not isinstance(self.attention_query_block, int) or self.attention_query_block < 0:
            raise UserError(f"ModelConfig.attention_query_block = {self.attention_query_block!r}; "
                            "it must be an int >= 0 (0 = no blocking)")
        if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise UserError(f"ModelConfig.loss_chunk = {self.loss_chunk!r}; it must be an int "
                            ">= 0 (0 = the whole sequence in one chunk)")
        if not self.deepnorm_beta > 0:
            raise UserError(f"ModelConfig.deepnorm_beta = {self.deepnorm_beta!r}; it must be > 0")
        if self.deepnorm_beta != 1.0 and self.num_experts:
            # Expert kernels are drawn by moe.py's own initialiser, which beta does not reach.
            raise UserError("ModelConfig.deepnorm_beta scales dense MLPs only; set "
                            "deepnorm_beta = 1.0 or num_experts = 0")
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.position == "rope_2d" and self.head_dim % 4:
            raise UserError(f"2D RoPE rotates two halves of each head: head_dim must be a "
                            f"multiple of 4, got {self.head_dim}")
        if isinstance(self.attention_windows, list):  # gin spells [0, 256] as a list
            object.__setattr__(self, "attention_windows", tuple(self.attention_windows))
        windows = self.attention_windows
        if (not isinstance(windows, tuple) or not windows
                or any(not isinstance(w, int) or isinstance(w, bool) or w < 0 for w in windows)):
            raise UserError(f"ModelConfig.attention_windows = {windows!r}; it must be a non-empty "
                            "tuple of ints >= 0 (0 = dense), e.g. (0, 256)")
        self._check_moe()

    def _check_moe(self) -> None:
        """Refuses mixture-of-experts settings that cannot route."""
        for field in ("num_experts", "moe_group_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"ModelConfig.{field} = {value!r}; it must be an int >= 0")
        if self.expert_mlp_activation not in (None, *_CHOICES["mlp_activation"]):
            raise UserError(f"ModelConfig.expert_mlp_activation = {self.expert_mlp_activation!r} "
                            f"is not supported; choose None or one of "
                            f"{list(_CHOICES['mlp_activation'])}")
        if self.num_experts == 0:
            return
        if self.num_experts == 1:
            raise UserError("ModelConfig.num_experts = 1; use 0 for a dense model or at least "
                            "2 experts")
        for field in ("experts_per_token", "moe_every"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"ModelConfig.{field} = {value!r}; it must be a positive int")
        if self.num_layers % self.moe_every:
            raise UserError(f"ModelConfig.num_layers = {self.num_layers} is not a multiple of "
                            f"moe_every = {self.moe_every}; pick a moe_every that divides it")
        k = _ROUTER_CHOICES[self.router]
        if k is not None and self.experts_per_token != k:
            raise UserError(f"the {self.router!r} router sends each token to {k} expert(s); set "
                            f"ModelConfig.experts_per_token = {k}")
        if self.experts_per_token > self.num_experts:
            raise UserError(f"ModelConfig.experts_per_token = {self.experts_per_token} exceeds "
                            f"num_experts = {self.num_experts}; lower it")
        for field in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, field) > 0:
                raise UserError(f"ModelConfig.{field} = {getattr(self, field)!r}; it must be > 0")
            # A row of one domain sends all its tokens to one expert (and mixing to all).
            if (self.router == "demix" and self.moe_dispatch == "dropping"
                    and getattr(self, field) < self.num_experts):
                raise UserError(f"the demix router would drop tokens at ModelConfig.{field} = "
                                f"{getattr(self, field)!r}; set it to num_experts = "
                                f"{self.num_experts} or moe_dispatch = 'dropless'")
        if not 0 <= self.router_jitter < 1:
            raise UserError(f"ModelConfig.router_jitter = {self.router_jitter!r}; it must be in "
                            "[0, 1)")
        for field in ("load_balance_loss_weight", "router_z_loss_weight"):
            if not getattr(self, field) >= 0:
                raise UserError(f"ModelConfig.{field} = {getattr(self, field)!r}; it must be >= 0")

    @classmethod
    def from_fields(cls, **fields) -> "ModelConfig":
        """These fields over the class defaults, whatever gin has bound.

        gin supplies every argument a call leaves out, so `ModelConfig(d_model=64)` made
        after a gin file was parsed would take that file's other values; code that builds
        a config from its own description (a checkpoint, a Hugging Face config) uses this.
        """
        values = {f.name: f.default for f in dataclasses.fields(cls)}
        values.update(fields)
        return cls(**values)

    def for_platform(self, platform: str) -> "ModelConfig":
        """This config with the choices left to 'auto' made for devices of `platform`."""
        changes = {}
        if self.layer_grad_boundary == "auto":
            # The recomputation was measured with XLA's CPU compiler. On a GPU the boundary's
            # conditional would copy its predicate to the host once per layer, so elsewhere
            # it stays off until a profile there shows the same duplication.
            changes["layer_grad_boundary"] = "on" if platform == "cpu" else "off"
        if self.remat_policy == "auto":
            changes["remat_policy"] = "save_dots" if platform == "cpu" else "none"
        if self.scan_unroll == "auto":
            # The whole stack as straight-line code on CPU (measured in docs/benchmarks.md);
            # a rolled loop elsewhere, which keeps TPU and GPU compile times flat in depth.
            changes["scan_unroll"] = self.num_layers if platform == "cpu" else 1
        if self.attention_impl == "auto":
            changes["attention_impl"] = {"tpu": "splash", "gpu": "cudnn",
                                         "cuda": "cudnn"}.get(platform, "blockwise")
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: vocab_size rounded up to vocab_pad_multiple."""
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def parameter_dtype(self) -> jnp.dtype:
        """The dtype parameters are created and stored in."""
        return jnp.dtype(self.param_dtype)

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype matmuls run in."""
        return jnp.dtype(self.dtype)

    @property
    def mlp_gated(self) -> bool:
        """Whether the MLP has a gate matrix (GLU variants)."""
        return self.mlp_activation in ("swiglu", "geglu")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the layers whose MLP is a mixture of experts: (i + 1) % moe_every == 0."""
        if not self.num_experts:
            return ()
        return tuple(i for i in range(self.num_layers) if (i + 1) % self.moe_every == 0)

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Each layer's attention band (0 = dense): attention_windows repeated over the stack."""
        pattern = self.attention_windows
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

"""The one owner of the train step: TrainConfig, its checks, and the mesh, shardings and jitted init / train / eval functions built from it.

The trainer, `paxlike layouts`, the benchmarks and the tests all build their step here
(`TrainProgram.from_config`), so what they measure is what a run executes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from paxlike.data.domains import DOMAIN_FEATURE, domain_names
from paxlike.data.glm_features import objective_inputs
from paxlike.data.stream import DataConfig, features, vocab_size
from paxlike.errors import UserError
from paxlike.model import moe_aux, param_tree
from paxlike.model.config import ModelConfig
from paxlike.model.losses import lm_head_loss
from paxlike.model.transformer import Transformer, head_weights
from paxlike.parallel import sharding
from paxlike.train.checkpointing import TrainState
from paxlike.train.optimizers import OptimizerConfig, learning_rate, make_optimizer

Mesh = jax.sharding.Mesh


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; the run gin files bind it."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)
    train_steps: int = 100
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic evaluation
    eval_steps: int | None = None  # batches per evaluation; None: the whole validation split
    seed: int = 0  # parameter initialisation
    max_bad_steps: int = 20  # non-finite steps in a row before the run stops
    init_from: str | None = None  # a model directory whose parameters start a fresh run
    # Microbatches per step: gradients summed over them in a scan, the memory of one.
    grad_accum_steps: int = 1
    # (first, last): trace these steps with jax.profiler into MODEL_DIR/tensorboard.
    profile_steps: tuple[int, int] | None = None

    def __post_init__(self):
        for field in ("train_steps", "checkpoint_every", "keep_checkpoints", "log_every",
                      "grad_accum_steps"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{field.upper()} = {value!r}; it must be a positive integer")
        if self.eval_steps is not None and (not isinstance(self.eval_steps, int)
                                            or isinstance(self.eval_steps, bool)
                                            or self.eval_steps < 1):
            raise UserError(f"EVAL_STEPS = {self.eval_steps!r}; give a positive number of "
                            "batches, or None for the whole validation split")
        if self.profile_steps is not None:
            steps = self.profile_steps
            if (not isinstance(steps, (tuple, list)) or len(steps) != 2 or not all(isinstance(x, int) for x in steps)
                    or not 1 <= steps[0] <= steps[1]):
                raise UserError(f"PROFILE_STEPS = {self.profile_steps!r}; give (first, last) "
                                "steps with 1 <= first <= last, e.g. (5, 7)")


def check_runnable(config: TrainConfig, mesh: Mesh) -> None:
    """Rejects configurations that cannot run, before anything touches the disk."""
    split = sharding.batch_size_divisor(mesh)
    if config.data.batch_size % split:
        raise UserError(
            f"BATCH_SIZE = {config.data.batch_size} is not divisible by the data-parallel size "
            f"{split} (data x fsdp x expert of MESH_SHAPE); use a multiple of {split}")
    k = config.grad_accum_steps
    if config.data.batch_size % (split * k):
        raise UserError(
            f"BATCH_SIZE = {config.data.batch_size} does not split into GRAD_ACCUM_STEPS = {k} "
            f"microbatches over the data-parallel size {split}; use a multiple of {split * k}")
    if config.data.seq_len > config.model.max_seq_len:
        raise UserError(
            f"SEQ_LEN = {config.data.seq_len} exceeds the model's max_seq_len = "
            f"{config.model.max_seq_len}; lower SEQ_LEN or raise ModelConfig.max_seq_len")
    data_vocab = vocab_size(config.data)
    if config.model.vocab_size < data_vocab:
        raise UserError(
            f"ModelConfig.vocab_size = {config.model.vocab_size} is smaller than the data's "
            f"vocabulary ({data_vocab}); set it to at least {data_vocab}")
    _check_domains(config)


def _check_domains(config: TrainConfig) -> None:
    """A domain-routed (demix) model needs the data's domains, one per expert."""
    if config.model.router != "demix" or not config.model.num_experts:
        return
    if not config.data.domain_ids:
        raise UserError("the demix router routes each token by its data domain; set "
                        "DataConfig.domain_ids = True")
    domains = domain_names(config.data)
    if len(domains) != config.model.num_experts:
        raise UserError(f"the demix router has one expert per domain, but ModelConfig.num_experts"
                        f" = {config.model.num_experts} for the {len(domains)} domains "
                        f"{list(domains)}; set num_experts = {len(domains)}")


def _opt_state_shardings(abstract_opt_state, param_shardings, abstract_params, mesh):
    """Shards each optimizer leaf like the parameter it tracks (matched by path and shape), else replicates."""
    by_path = {}
    for (path, leaf), shard in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                   jax.tree_util.tree_leaves(param_shardings)):
        by_path[param_tree.path_names(path)] = (leaf.shape, shard)

    def pick(path, leaf):
        names = param_tree.path_names(path)
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def _check_vocab_shards(cfg, mesh, rules) -> None:
    """Refuses a padded vocabulary that the mesh axes holding the `vocab` dimension do not divide."""
    axes = nn.logical_to_mesh_axes(("vocab",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if cfg.padded_vocab_size % shards:
        fix = np.lcm(cfg.vocab_pad_multiple, shards)
        raise UserError(
            f"the vocabulary table has {cfg.padded_vocab_size} rows (vocab_size {cfg.vocab_size} "
            f"padded to a multiple of {cfg.vocab_pad_multiple}), which the {shards}-way "
            f"{'x'.join(axes)} mesh axis does not divide; set "
            f"--gin.ModelConfig.vocab_pad_multiple={fix}")


class TrainProgram:
    """The model, optimizer and their jitted, sharded init / train / eval functions."""

    @classmethod
    def from_config(cls, config: TrainConfig,
                    devices: Sequence[jax.Device] | None = None) -> "TrainProgram":
        """The program of `config` on `devices` (default: all): mesh, rule table and checks included.

        Raises UserError for a configuration that cannot run on that mesh, before
        anything is allocated or written. Nothing is traced or compiled yet.
        """
        mesh = sharding.make_mesh(config.mesh, devices)
        rules = tuple(config.mesh.rules)
        check_runnable(config, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return cls(config, mesh, rules)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The mesh and rule table in force: trace, compile and run the program's functions inside."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def __init__(self, config: TrainConfig, mesh: Mesh, rules: tuple):
        """Builds abstract state, shardings and the jitted functions; prefer `from_config`."""
        self.config, self.mesh, self.rules = config, mesh, rules
        platform = mesh.devices.flat[0].platform
        self.model_config = config.model.for_platform(platform)
        _check_vocab_shards(self.model_config, mesh, rules)
        self.model = Transformer(self.model_config)
        self.optimizer = make_optimizer(config.optimizer, config.train_steps, platform)
        self.tx, self.schedule = self.optimizer.tx, self.optimizer.schedule
        b, t = config.data.batch_size, config.data.seq_len
        self.batch_sharding = sharding.batch_sharding(mesh, rules)
        self.abstract_batch = {
            k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=self.batch_sharding)
            for k in features(config.data)}
        # The key is made inside the trace: nothing runs, even on a described (absent) TPU mesh.
        boxed = jax.eval_shape(lambda: self._init_boxed_params(jax.random.key(0)))
        self.abstract_params = sharding.strip_boxes(boxed)
        param_shardings = sharding.logical_shardings(boxed, mesh, rules)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.state_shardings = TrainState(
            step=sharding.replicated(mesh),
            params=param_shardings,
            opt_state=_opt_state_shardings(abstract_opt, param_shardings, self.abstract_params, mesh),
        )
        abstract_state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), self.abstract_params,
                                    abstract_opt)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state, self.state_shardings)
        self.init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        metric_sharding = sharding.replicated(mesh)
        self.train_step = jax.jit(
            self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, metric_sharding), donate_argnums=(0,))
        # Finite gradients give finite weights unless the learning rate overflows float32;
        # the trainer checks before each save (a pass over the weights, so not every step).
        self.weights_finite = jax.jit(
            lambda params: jax.tree.reduce(
                jnp.logical_and, jax.tree.map(lambda p: jnp.isfinite(p).all(), params)),
            in_shardings=(self.state_shardings.params,), out_shardings=metric_sharding)
        self.eval_step = jax.jit(
            self._eval_step, in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=metric_sharding)

    def _init_boxed_params(self, rng):
        t = self.config.data.seq_len
        ids = jnp.zeros((1, t), jnp.int32)
        return self.model.init(rng, ids, ids, ids)["params"]

    def _init_state(self, rng) -> TrainState:
        params = sharding.strip_boxes(self._init_boxed_params(rng))
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    def _loss_terms(self, params, batch):
        """Summed (cross-entropy, z-loss, weight) of the model as evaluated."""
        return self._forward_terms(params, batch, None)[:3]

    def _forward_terms(self, params, batch, rng):
        """Summed (cross-entropy, z-loss, weight) and the MoE metrics; given `rng`, the model routes as in training."""
        train = rng is not None
        # The model stops at the final norm; the loss applies the output layer in chunks.
        x_btd, variables = self.model.apply(
            {"params": params}, batch["decoder_input_tokens"], batch["decoder_positions"],
            batch["decoder_segment_ids"], return_hidden=True, train=train,
            rngs={"moe": rng} if train else None, mutable=[moe_aux.MOE_AUX],
            domain_ids_bt=batch.get(DOMAIN_FEATURE),
            **objective_inputs(self.model_config, batch))
        ce, z, weight = lm_head_loss(
            self.model_config, x_btd, head_weights(self.model_config, params),
            batch["decoder_target_tokens"], batch["decoder_loss_weights"])
        return ce, z, weight, moe_aux.metrics(self.model_config, variables)

    def _grads(self, params, batch, rng):
        """Summed (cross-entropy, z-loss, weight), mean MoE metrics, and the total's gradient, over GRAD_ACCUM_STEPS microbatches.

        Sums, not means, so microbatches add up to exactly the full batch's terms; the
        caller divides by the total weight. The MoE metrics are means over tokens: averaged
        over the microbatches, and the auxiliary loss scaled by the batch's weight over k in
        the summed total. The microbatches are scanned: activations of one microbatch live
        at a time. Microbatch i takes rows i, i + k, i + 2k, ... so that each device keeps
        contributing its own rows and no row moves between devices.
        """
        k = self.config.grad_accum_steps
        aux_scale = jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)) / k

        def sums(p, micro, key):
            ce, z, weight, moe = self._forward_terms(p, micro, key)
            return ce + z + moe_aux.aux_loss(moe) * aux_scale, (ce, z, weight, moe)

        grad_fn = jax.value_and_grad(sums, has_aux=True)
        if k == 1:
            (_, terms), grads = grad_fn(params, batch, rng)
            return terms, grads
        micro_batches = {name: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
                         for name, x in batch.items()}

        def body(carry, xs):
            terms, grads = carry
            micro, i = xs
            (_, micro_terms), micro_grads = grad_fn(params, micro, jax.random.fold_in(rng, i))
            grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads, micro_grads)
            return (jax.tree.map(jnp.add, terms, micro_terms), grads), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zero = jnp.zeros((), jnp.float32)
        start = (zero, zero, zero, moe_aux.zero_metrics(self.model_config))
        (terms, grads), _ = jax.lax.scan(body, (start, zeros), (micro_batches, jnp.arange(k)))
        ce, z, weight, moe = terms
        terms = ce, z, weight, {name: value / k for name, value in moe.items()}
        return terms, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    def _train_step(self, state: TrainState, batch):
        # Mixture-of-experts routing noise: a stream of its own per step.
        rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)
        (ce, z, weight, moe), grads = self._grads(state.params, batch, rng)
        grads = jax.tree.map(lambda g: g / weight.astype(g.dtype), grads)
        total, ce, z = (ce + z) / weight + moe_aux.aux_loss(moe), ce / weight, z / weight
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient skips the update: the step counter (and the
        # data) move on, the weights and optimizer state do not.
        ok = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        params, opt_state = self.optimizer.apply(grads, state.opt_state, state.params,
                                                 grad_norm, ok)
        metrics = {"loss": ce, "z_loss": z, "total_loss": total, "grad_norm": grad_norm,
                   "learning_rate": learning_rate(self.optimizer, state.opt_state),
                   "skipped": 1 - ok.astype(jnp.int32), **moe}
        return TrainState(state.step + 1, params, opt_state), metrics

    def _eval_step(self, params, batch):
        ce, z, weight = self._loss_terms(params, batch)
        return {"ce_sum": ce, "weight": weight}

    def device_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assembles the global batch from this process's rows."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in local_batch.items()}

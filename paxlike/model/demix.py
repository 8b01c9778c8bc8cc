"""DEMix layers (Gururangan et al. 2021): an expert per data domain, mixed by a domain posterior.

Training routes every token to the expert of its document's domain (the `demix` router,
fed the data's per-token domain ids). At inference the domain is unknown; the paper
treats it as a latent variable,

    p(x_t | x_<t) = sum_j p(x_t | x_<t, D = j) p(D = j | x_<t),
    p(D = j | x_<t) ∝ p(x_<t | D = j) p(D = j),

where p(x_<t | D = j) is the likelihood of the document so far under expert j alone (every
DEMix layer routed to j), and uses the posterior as the weights of the experts' outputs
in every DEMix layer, h = sum_j p(D = j | x_<t) FFN_j(h) (the paper's "weighted ensemble";
it is what `mixed_logits` computes, one posterior per token, restarted at each packed
document). The prior p(D = j) is the paper's "updating" prior, an exponential moving
average of the posteriors of documents seen before (weight `decay` = 0.3 on the old prior,
as the paper's lambda), or its "cached" prior: that average estimated over held-out
documents once (`cached_prior`) and then kept fixed.

A new domain gets an expert of its own without touching the others (`add_domain_expert`):
every DEMix layer appends a copy of one existing expert (`nearest_expert`: the one with the
highest posterior on the new domain's text, as the paper initialises it), and only that
copy needs training, with the new Task appended to DataConfig.domains.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from paxlike.errors import UserError
from paxlike.model import param_tree
from paxlike.model.config import ModelConfig
from paxlike.model.moe import is_expert_param
from paxlike.model.transformer import Transformer

PRIOR_DECAY = 0.3  # the paper's lambda: the weight an updating prior keeps on its past


def _check(cfg: ModelConfig) -> None:
    if cfg.router != "demix" or not cfg.num_experts:
        raise UserError(f"DEMix mixing needs a model with router = 'demix' and experts; this one "
                        f"has router = {cfg.router!r}, num_experts = {cfg.num_experts}")


def _batch_arrays(batch: dict) -> tuple[jnp.ndarray, ...]:
    return tuple(jnp.asarray(batch[k]) for k in (
        "decoder_input_tokens", "decoder_positions", "decoder_segment_ids",
        "decoder_target_tokens"))


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg: ModelConfig, params, tokens_bt, positions_bt, segments_bt, domains):
    return Transformer(cfg).apply({"params": params}, tokens_bt, positions_bt, segments_bt,
                                  domain_ids_bt=domains)


@functools.partial(jax.jit, static_argnums=0)
def _log_likelihoods(cfg: ModelConfig, params, tokens_bt, positions_bt, segments_bt,
                     targets_bt) -> jnp.ndarray:
    def one_expert(j):
        domains_bt = jnp.full(tokens_bt.shape, j, jnp.int32)
        logits_btv = _logits(cfg, params, tokens_bt, positions_bt, segments_bt, domains_bt)
        logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
        return jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]

    return jnp.stack([one_expert(j) for j in range(cfg.num_experts)])


def expert_log_likelihoods(cfg: ModelConfig, params, batch: dict) -> jnp.ndarray:
    """(E, B, T) log p(target_t | targets before t, D = j): every DEMix layer routed to expert j."""
    _check(cfg)
    return _log_likelihoods(cfg, params, *_batch_arrays(batch))


@functools.partial(jax.jit, static_argnums=2)
def _document_evidence(loglik_ebt: jnp.ndarray, segment_ids_bt: jnp.ndarray,
                       inclusive: bool) -> jnp.ndarray:
    """(B, T, E) log-likelihood of each token's document before it (or up to it, inclusive)."""
    ll_bte = jnp.moveaxis(loglik_ebt, 0, -1) * (segment_ids_bt > 0)[..., None]
    through_bte = jnp.cumsum(ll_bte, axis=1)
    before_bte = through_bte - ll_bte
    t = jnp.arange(segment_ids_bt.shape[1])
    starts_bt = jnp.concatenate([jnp.ones_like(segment_ids_bt[:, :1], bool),
                                 segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    start_bt = jax.lax.cummax(jnp.where(starts_bt, t, 0), axis=1)
    offset_bte = jnp.take_along_axis(before_bte, start_bt[..., None], axis=1)
    return (through_bte if inclusive else before_bte) - offset_bte


@jax.jit
def posterior(loglik_ebt: jnp.ndarray, segment_ids_bt: jnp.ndarray,
              prior_e: jnp.ndarray) -> jnp.ndarray:
    """(B, T, E) p(D = j | its document's tokens before t): Bayes with the experts' likelihoods.

    Packed documents (segments) are independent: each starts again from the prior.
    """
    log_prior_e = jnp.log(jnp.asarray(prior_e, jnp.float32))
    return jax.nn.softmax(log_prior_e + _document_evidence(loglik_ebt, segment_ids_bt, False),
                          axis=-1)


def document_posteriors(loglik_ebt, segment_ids_bt, prior_e) -> np.ndarray:
    """(documents, E) p(D = j | a whole document) for each packed document, rows then segments."""
    log_prior_e = np.log(np.asarray(prior_e, np.float64))
    evidence_bte = np.asarray(_document_evidence(loglik_ebt, segment_ids_bt, True), np.float64)
    segments_bt = np.asarray(segment_ids_bt)
    out = []
    for b in range(segments_bt.shape[0]):
        for seg in np.unique(segments_bt[b][segments_bt[b] > 0]):
            last = np.flatnonzero(segments_bt[b] == seg)[-1]
            logits_e = log_prior_e + evidence_bte[b, last]
            p_e = np.exp(logits_e - logits_e.max())
            out.append(p_e / p_e.sum())
    return np.asarray(out).reshape(-1, len(log_prior_e))


def update_prior(prior_e, doc_posteriors_ne, decay: float = PRIOR_DECAY) -> np.ndarray:
    """The updating prior after these documents in order: decay * prior + (1 - decay) * each."""
    prior_e = np.asarray(prior_e, np.float64)
    for p_e in np.asarray(doc_posteriors_ne, np.float64):
        prior_e = decay * prior_e + (1 - decay) * p_e
    return prior_e


def cached_prior(cfg: ModelConfig, params, batches, decay: float = PRIOR_DECAY) -> np.ndarray:
    """The paper's cached prior: the updating prior run over held-out `batches`, from uniform."""
    _check(cfg)
    prior_e = np.full((cfg.num_experts,), 1 / cfg.num_experts)
    for batch in batches:
        loglik_ebt = expert_log_likelihoods(cfg, params, batch)
        prior_e = update_prior(prior_e, document_posteriors(
            loglik_ebt, batch["decoder_segment_ids"], prior_e), decay)
    return prior_e


def mixed_logits(cfg: ModelConfig, params, batch: dict, prior_e) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(logits (B, T, V), posterior (B, T, E)): every DEMix layer a posterior-weighted mix."""
    loglik_ebt = expert_log_likelihoods(cfg, params, batch)
    tokens_bt, positions_bt, segments_bt, _ = _batch_arrays(batch)
    weights_bte = posterior(loglik_ebt, segments_bt, prior_e)
    return _logits(cfg, params, tokens_bt, positions_bt, segments_bt, weights_bte), weights_bte


def nearest_expert(cfg: ModelConfig, params, batch: dict) -> int:
    """The expert with the highest mean posterior (uniform prior) over the documents of `batch`."""
    loglik_ebt = expert_log_likelihoods(cfg, params, batch)
    uniform_e = np.full((cfg.num_experts,), 1 / cfg.num_experts)
    return int(np.argmax(document_posteriors(loglik_ebt, batch["decoder_segment_ids"],
                                             uniform_e).mean(axis=0)))


def add_domain_expert(cfg: ModelConfig, params, init_from: int) -> tuple[ModelConfig, dict]:
    """(config, params) with one more expert in every DEMix layer, a copy of expert `init_from`.

    Every other parameter, the existing experts' included, is the same array as before:
    the model routed to an old domain computes what it did.
    """
    _check(cfg)
    if not isinstance(init_from, int) or not 0 <= init_from < cfg.num_experts:
        raise UserError(f"init_from = {init_from!r}; name an existing expert, 0 to "
                        f"{cfg.num_experts - 1}")

    def grow(path: str, leaf):
        if not is_expert_param(path):
            return leaf
        # Stacked expert kernels end (E, in, out), biases (E, out); a scanned stack adds
        # its layer axis in front.
        axis = leaf.ndim - (3 if path.endswith("kernel") else 2)
        copy = jax.lax.slice_in_dim(leaf, init_from, init_from + 1, axis=axis)
        return jnp.concatenate([leaf, copy], axis=axis)

    flat = param_tree.flatten(params)
    grown = param_tree.unflatten({path: grow(path, leaf) for path, leaf in flat.items()})
    return dataclasses.replace(cfg, num_experts=cfg.num_experts + 1), grown

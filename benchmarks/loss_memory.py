"""Compiled temporary memory of the output layer + loss (forward and backward), chunked against whole.

PaLM's 256k vocabulary at 2048 tokens: the whole-sequence loss materialises float32
(batch, T, vocab) logits and their gradient; the chunked loss (ModelConfig.loss_chunk)
holds one chunk's. Compiled for one TPU chip (libtpu's description, nothing runs) and for
this host's CPU; the figures are the compiler's memory_analysis(). The defaults are one
device's share of a sharded run: 8 sequences, and an embedding table of 256k x 512 (PaLM
8B's 256k x 4096 split 8 ways), since on one device a whole table's gradient and cast
copies would be weight-sized buffers that no sharded run holds.

    python benchmarks/loss_memory.py --json loss_memory.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from report import emit  # noqa: E402

from paxlike.model.config import ModelConfig  # noqa: E402
from paxlike.model.losses import lm_head_loss  # noqa: E402


def temp_bytes(cfg: ModelConfig, batch: int, seq_len: int, device) -> int:
    """Temporary bytes of jit(grad(loss)) compiled for `device`."""
    d, v = cfg.d_model, cfg.padded_vocab_size
    sharding = jax.sharding.SingleDeviceSharding(device)

    def loss(x, w, targets, weights):
        ce, z, _ = lm_head_loss(cfg, x, w, targets, weights)
        return ce + z

    dt = cfg.compute_dtype
    args = (jax.ShapeDtypeStruct((batch, seq_len, d), dt, sharding=sharding),
            jax.ShapeDtypeStruct((v, d), jnp.float32, sharding=sharding),
            jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sharding),
            jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=sharding))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="sequences per device")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 256])
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    targets = [("cpu", jax.devices("cpu")[0], "float32")]
    try:
        from paxlike.parallel import topology

        targets.insert(0, ("tpu_v4", topology.tpu_target("v4:2x2x1").devices[0], "bfloat16"))
    except Exception as e:  # noqa: BLE001 - no libtpu: CPU figures only
        print(f"no TPU compiler: {e}", file=sys.stderr)
    rows = []
    for name, device, dtype in targets:
        for chunk in args.chunks:
            cfg = ModelConfig.from_fields(vocab_size=args.vocab, d_model=args.d_model,
                                          loss_chunk=chunk, dtype=dtype)
            temp = temp_bytes(cfg, args.batch, args.seq_len, device)
            rows.append({"target": name, "compute_dtype": dtype, "loss_chunk": chunk,
                         "temp_bytes": temp, "temp_gib": round(temp / 2**30, 3)})
    logits = args.batch * args.seq_len * args.vocab * 4
    emit({"vocab": args.vocab, "d_model": args.d_model, "seq_len": args.seq_len,
          "batch_per_device": args.batch, "float32_logits_bytes": logits, "rows": rows}, args.json)


if __name__ == "__main__":
    main()

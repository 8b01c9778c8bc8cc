"""Peak host memory of `paxlike convert` on a 1.35B-parameter LLaMA, against its largest tensor.

Builds a randomly initialised LLaMA with transformers (hidden 2048, 24 layers, 16 heads,
intermediate 5504, vocabulary 32000, untied head; 1,345,423,360 parameters), allocated in
bfloat16 from 'meta' so that one copy exists, and saves it with save_pretrained(...,
max_shard_size="1GB"): a real sharded transformers checkpoint. Then `paxlike convert
from-hf` and `to-hf` run as child processes, each one's peak resident set size read from
os.wait4's ru_maxrss; a child that imports paxlike, jax and the converter and starts
JAX's CPU backend, converting nothing, gives the fixed overhead. Every tensor written
back is compared with the source. Needs about 14 GB of disk (float32) under --work_dir.

Linux starts a child's ru_maxrss at its parent's resident size, so this process imports
nothing heavy: building the model and the comparison run in child processes too.

    python benchmarks/hf_convert_memory.py --work_dir /tmp/hf_convert_bench [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import emit  # noqa: E402

SHAPE = {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
         "num_key_value_heads": 16, "intermediate_size": 5504, "vocab_size": 32000,
         "max_position_embeddings": 2048, "tie_word_embeddings": False}
BASELINE = "import jax, paxlike; from paxlike.hf import convert; jax.devices()"


def make_source(hf_dir: str) -> None:
    """Saves a random bfloat16 LLaMA of SHAPE as 1GB safetensors shards, holding one copy of it."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**SHAPE)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(hf_dir, safe_serialization=True, max_shard_size="1GB")


def measure(command: list[str], log_path: str) -> tuple[int, float]:
    """(peak resident bytes, seconds) of `command` run as a child process (output to `log_path`); it must succeed."""
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        # The rusage of this one child: ru_maxrss is its peak resident set, in kilobytes.
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        with open(log_path, errors="replace") as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{tail}")
    return usage.ru_maxrss * 1024, seconds


def compare(source_dir: str, back_dir: str, dtype: str) -> dict:
    """Checks every tensor of `back_dir` against the source's in `dtype`, one at a time; the source's sizes."""
    import ml_dtypes
    import numpy as np

    from paxlike.hf.convert import open_hf_dir
    from paxlike.hf.families import FAMILIES

    _, _, source = open_hf_dir(source_dir, FAMILIES["llama"])
    _, _, back = open_hf_dir(back_dir, FAMILIES["llama"])
    assert sorted(source.entries) == sorted(back.entries)
    target = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    for name in source.entries:
        expected, got = source.read(name).astype(target), back.read(name)
        if got.dtype != target or not np.array_equal(got.view(np.uint8), expected.view(np.uint8)):
            raise SystemExit(f"tensor {name} differs after from-hf + to-hf")
    largest = max(source.entries, key=lambda n: source.entries[n].nbytes)
    return {"parameters": sum(int(np.prod(e.shape)) for e in source.entries.values()),
            "largest_tensor": largest, "largest_tensor_bytes": source.entries[largest].nbytes,
            "tensors_equal_after_round_trip": len(source.entries)}


def _in_child(call: str, log_path: str) -> None:
    """Runs `call` (an expression on this module, `b`) in a child process."""
    here = os.path.dirname(os.path.abspath(__file__))
    measure([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); "
             f"import hf_convert_memory as b; {call}"], log_path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True, help="scratch directory (emptied first)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="paxlike's parameter dtype (from-hf --dtype)")
    parser.add_argument("--keep", action="store_true", help="leave the checkpoints in --work_dir")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    os.makedirs(args.work_dir)
    need = (2.7 + (2 * 5.4 if args.dtype == "float32" else 2 * 2.7)) * 1e9
    free = shutil.disk_usage(args.work_dir).free
    if free < need:
        raise SystemExit(f"{args.work_dir} has {free / 1e9:.1f} GB free; the benchmark writes "
                         f"{need / 1e9:.1f} GB")
    source, pax, back = (os.path.join(args.work_dir, n) for n in ("hf", "pax", "hf_back"))
    log = os.path.join(args.work_dir, "{}.log").format
    facts = os.path.join(args.work_dir, "facts.json")
    paxlike = [sys.executable, "-m", "paxlike.cli", "convert"]
    try:
        _in_child(f"b.make_source({source!r})", log("make_source"))
        baseline, _ = measure([sys.executable, "-c", BASELINE], log("baseline"))
        from_peak, from_seconds = measure(
            paxlike + ["from-hf", "--family", "llama", "--hf_dir", source, "--model_dir", pax,
                       "--dtype", args.dtype], log("from_hf"))
        to_peak, to_seconds = measure(
            paxlike + ["to-hf", "--model_dir", pax, "--hf_dir", back, "--max_shard_size", "1GB"],
            log("to_hf"))
        _in_child(f"import json; json.dump(b.compare({source!r}, {back!r}, {args.dtype!r}), "
                  f"open({facts!r}, 'w'))", log("compare"))
        with open(facts) as f:
            result = json.load(f)
    finally:
        if not args.keep:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    largest = result["largest_tensor_bytes"]  # as stored in the source checkpoint (bfloat16)
    result = {
        "model": {**SHAPE, "source": "save_pretrained bfloat16, 1GB shards"},
        "dtype": args.dtype,
        **result,
        "largest_tensor_bytes_converted": largest // 2 * (4 if args.dtype == "float32" else 2),
        "baseline_rss_bytes": baseline,
        "baseline": BASELINE,
        # A child's ru_maxrss is at least this process's resident size when it started it.
        "launcher_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    for direction, peak, seconds in (("from_hf", from_peak, from_seconds),
                                     ("to_hf", to_peak, to_seconds)):
        result[direction] = {"peak_rss_bytes": peak, "seconds": round(seconds, 1),
                             "ratio": round((peak - baseline) / largest, 3)}
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    emit(result, args.json)


if __name__ == "__main__":
    main()

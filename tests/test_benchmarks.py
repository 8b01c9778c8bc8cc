"""The throughput benchmark end to end at a tiny size: both layer stacks, PyTorch beside them, consistent JSON."""

import json
import math
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--gin.ModelConfig.vocab_size=512", "--gin.ModelConfig.d_model=64",
        "--gin.ModelConfig.num_layers=2", "--gin.ModelConfig.num_heads=4",
        "--gin.ModelConfig.num_kv_heads=4", "--gin.ModelConfig.head_dim=16",
        "--gin.ModelConfig.d_ff=256"]


def test_train_throughput_vs_torch_reports_consistent_ratios(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_throughput.py"), "--vs-torch",
         "--seq_len", "32", "--batch", "2", "--rounds", "3", "--steps", "1", "--json", str(out),
         *TINY], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    tokens = 2 * 32
    for name in ("paxlike_scanned", "paxlike_unrolled", "torch"):
        entry = report[name]
        assert len(entry["step_times_s"]) == 3
        assert entry["step_time_s"] == np.median(entry["step_times_s"])
        assert math.isclose(entry["tokens_per_sec"], tokens / entry["step_time_s"], rel_tol=1e-9)
        # Two steps from a fresh init on random tokens: cross-entropy near ln(512).
        assert abs(entry["final_loss"] - math.log(512)) < 1.0, (name, entry["final_loss"])
    for stack in ("scanned", "unrolled"):
        per_round = [t / p for p, t in zip(report[f"paxlike_{stack}"]["step_times_s"],
                                           report["torch"]["step_times_s"])]
        assert math.isclose(report[f"paxlike_{stack}_over_torch_tokens_per_sec"],
                            float(np.median(per_round)), rel_tol=1e-9)
    assert report["paxlike_scanned"]["flops_per_token"] == report["paxlike_unrolled"]["flops_per_token"]


def test_op_profile_attributes_the_step_to_ops_kinds_and_layers(tmp_path):
    out = tmp_path / "ops.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "op_profile.py"), "--seq_len", "32",
         "--batch", "2", "--steps", "1", "--json", str(out),
         "--gin.ModelConfig.scan_layers=False", *TINY],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    total = report["op_ms_per_step_total"]
    assert report["step_s"] > 0 and total > 0
    for view in ("by_kind", "by_source", "by_op"):
        times = [row["ms_per_step"] for row in report[view]]
        # Each row and the total are rounded to 0.01 ms (the total to 0.1).
        assert times == sorted(times, reverse=True), view
        assert 0 < sum(times) <= total + 0.01 * len(times) + 0.05, view
    # Runtime bookkeeping is not an op; the two layers' ops are folded into one source.
    assert not any(row["name"].startswith("ThunkExecutor") for row in report["by_op"])
    sources = [row["name"] for row in report["by_source"]]
    assert any("layers_N" in name for name in sources)
    assert not any("layers_0" in name or "layers_1" in name for name in sources)

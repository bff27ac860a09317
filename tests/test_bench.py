"""The benchmark suite runs end to end at toy sizes and writes a complete report (no timing
assertions: figures live in the report, never in tests)."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from bench import run as bench_run  # noqa: E402


def test_smoke_suite_writes_a_complete_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "smoke" and report["machine"]["cores"] >= 1 and report["copy_bandwidth_gb_s"] > 0
    m = report["machine"]  # what both sides ran with: threads, the reference's BLAS, the CPU and its ISA
    cpu_flags = set(open("/proc/cpuinfo").read().split())
    assert m["xla_intra_op_threads"] >= 1 and m["cpu"] and set(m["isa_flags"]) <= cpu_flags
    assert ("avx2" in m["isa_flags"]) == ("avx2" in cpu_flags)
    ref = m["reference"]
    assert ref["intra_op_threads"] >= 1 and ref["inter_op_threads"] >= 1 and ref["blas"] not in ("", "unknown")
    r = report["results"]
    for name in ("train_small", "train_124M"):
        for key in ("ours_float32_tok_s", "ours_bfloat16_tok_s", "reference_tok_s", "reference_bf16_tok_s",
                    "mfu_float32", "ratio_f32", "ratio_bf16"):
            assert math.isfinite(r[name][key]) and r[name][key] > 0, (name, key)
        assert r[name]["compile_s"]["float32"] > 0
    for batch in ("batch_1", "batch_2", "batch_1_bf16", "batch_2_bf16"):
        assert r["generate"][batch]["ours_tok_s"] > 0 and r["generate"][batch]["reference_tok_s"] > 0
    batch_1 = r["generate"]["batch_1"]
    assert 0 < batch_1["fraction_of_copy_bandwidth"] and batch_1["copy_bandwidth_gb_s"] > 0
    assert all(r["generate"][b]["context_free_step_ms"] > 0 and r["generate"][b]["ceiling_ratio"] > 0
               and 0 < r["generate"][b]["fraction_of_ceiling"] and r["generate"][b]["cache_read_ms"] > 0 for b in ("batch_1", "batch_2"))
    for b in ("batch_1", "batch_2", "batch_1_bf16", "batch_2_bf16"):  # memory alone: weights + cache at copy speed
        row = r["generate"][b]
        expected = int(b[6]) * row["copy_bandwidth_gb_s"] * 1e9 / row["weight_bytes_per_token"]
        assert 0 < row["bandwidth_ceiling_tok_s"] < expected and row["bandwidth_ceiling_ratio"] > 0
    assert r["eval"]["ratio"] > 0 and r["eval"]["ours_bf16_tok_s"] > 0 and r["eval"]["ratio_bf16"] > 0
    e, (L, D, T) = r["eval"], (r["eval"]["shape"]["n_layer"], r["eval"]["shape"]["n_embd"], r["eval"]["shape"]["n_ctx"])
    assert e["flops_per_token"] > 4 * L * T * D and e["peak_gflops_float32"] > 0 and e["peak_gflops_bfloat16"] > 0
    # The report keeps the peak in GFLOP/s, so rebuilding the ratio from it rounds differently in the last bit.
    assert e["mfu_float32"] == pytest.approx(e["ours_tok_s"] * e["flops_per_token"] / (e["peak_gflops_float32"] * 1e9),
                                             rel=1e-12)
    checks = {name: bound for name, _, _, _, bound in bench_run.target_checks(r)}
    bound = checks["evaluation 8 x 1024 vs reference, float32"]  # computed from the report, never "(see README)"
    needed = 1.5 * e["reference_tok_s"] * e["flops_per_token"] / 1e9
    assert f"needs {needed:,.0f} GFLOP/s" in bound and f"({e['peak_gflops_float32']:,.0f} GFLOP/s)" in bound
    t = r["train_124M"]  # the float32 training bound: the MFU 1.2x the reference would take
    needed = t["mfu_float32"] * 1.2 * t["reference_tok_s"] / t["ours_float32_tok_s"]
    bound = checks["training 124M, float32 vs reference"]
    assert f"needs {needed:.0%} of" in bound and f"({t['peak_gflops_float32']:,.0f} GFLOP/s" in bound
    # bfloat16 weights are half the bytes a step reads
    g = r["generate"]
    assert g["batch_1_bf16"]["weight_bytes_per_token"] < 0.52 * g["batch_1"]["weight_bytes_per_token"]
    # Timing weights are GPT-2's near-uniform init: the two losses are no accuracy check (that is
    # tests/test_model.py's bf16 test), only finite.
    assert math.isfinite(r["eval"]["loss_bfloat16"]) and math.isfinite(r["eval"]["loss_float32"])
    assert r["data"]["encode_mb_s"] > 0 and r["data"]["tokens"] > 0 and r["data"]["pipeline_tok_s_ctx128_b16"] > 0
    assert r["data"]["parquet_tok_s_ctx1024_b8"] > 0 and r["data"]["shards_tok_s_ctx1024_b8"] > 0
    q = r["ttq"]
    assert q["steps"] > 1 and 0 < q["heldout_bits_per_byte"] < 10
    md = (tmp_path / "report.md").read_text()
    assert "## Training" in md and "## Generation" in md and "ceiling tokens/s" in md and "## Time to quality" in md
    assert "memory-only ceiling tokens/s" in md
    assert "of copy bandwidth" in md and "Threads: ours (XLA:CPU)" in md and f"BLAS {ref['blas']}" in md
    assert "bandwidth limit" not in md
    assert not any(k.startswith("peak_") and k.endswith("_tok_s") for k in r["eval"])  # probes are no rows


def test_the_peak_is_the_fastest_probe_in_the_benchmarks_turns_when_that_beats_the_first():
    """MFU divides by the higher of the process's first peak measurement and the fastest probe
    run in the benchmark's own turns: a slow moment at the first measurement (a shared machine
    once gave 218 GFLOP/s float32 against 383 minutes before) no longer puts a step above 100%."""
    from gpt2train.config import Config
    from gpt2train.metrics import PEAK_N, peak_flops_per_device
    cfg = Config(precision="float32").validate()
    first, _ = peak_flops_per_device(cfg)
    flops = 2 * PEAK_N ** 3
    assert bench_run.best_peak(cfg, {}) == first
    assert bench_run.best_peak(cfg, {"peak_float32": flops / (first * 2)}) == pytest.approx(2 * first, rel=1e-12)
    assert bench_run.best_peak(cfg, {"peak_float32": flops / (first / 2)}) == first
    assert bench_run.best_peak(cfg, {"peak_bfloat16": flops / (first * 2)}) == first  # another precision's probe
    probes = bench_run.peak_probes(("float32", "bfloat16"))
    assert set(probes) == {"peak_float32", "peak_bfloat16"}
    secs = bench_run.alternate(probes, 2, fastest=tuple(probes))
    assert all(s > 0 for s in secs.values())

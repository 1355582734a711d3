"""The GPU benchmark's own code paths, tiny and on the CPU (``--small --device cpu``)."""

from __future__ import annotations

import json

from conftest import REPO, run_cli


def test_the_throughput_benchmark_runs_every_part_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_cli(["benchmarks.gpu_throughput", "--small", "--device", "cpu", "--out", str(out)], cwd=REPO,
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert all(parts[name]["ok"] for name in ("unet", "worker", "runs", "scaling")), {
        name: part.get("error") for name, part in parts.items()}
    for row in (parts["unet"]["cifar10"], parts["unet"]["celeba"]):
        assert all(row[mode] > 0 for mode in ("eager fp32", "bf16", "compiled bf16 channels_last"))
    assert parts["worker"]["in_process_nfe_per_s"] > 0 and parts["worker"]["ray_actor_nfe_per_s"] > 0
    for run in ("cifar10 sync", "celeba async lag 1"):
        r = parts["runs"][run]
        assert r["time/iteration_s"] > 0 and r["chains_per_s"] > 0 and r["bytes/rollout_blocks"] > 0
        assert 0 < r["time/rollout_s"] and 0 < r["time/critic_s"] and 0 < r["time/learner_s"]
    assert set(parts["scaling"]["workers"]) == {"1", "2"}
    assert parts["scaling"]["workers"]["1"]["rollout_speedup"] == 1.0
    assert "| U-Net NFE/s |" in report["markdown"] and "| rollout workers |" in report["markdown"]

"""The GPU benchmark's own code paths, tiny and on the CPU (``--small --device cpu``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
        assert 0 < r["time/learner_gather_s"] < r["time/iteration_s"]
    assert set(parts["scaling"]["workers"]) == {"1", "2"}
    assert parts["scaling"]["workers"]["1"]["rollout_speedup"] == 1.0
    assert "| U-Net NFE/s |" in report["markdown"] and "| rollout workers |" in report["markdown"]


def test_the_data_path_benchmark_compares_the_two_paths_tiny(tmp_path):
    out = tmp_path / "data-path.json"
    result = run_cli(["benchmarks.data_path", "--small", "--repeats", "1", "--out", str(out)], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for r in report["configs"].values():
        assert all(len(s) == 1 and s[0] > 0 for s in r["seconds_all"].values())
        put = r["object_store_bytes_beside_the_blocks"]
        assert put["learner gathers"] < put["buffer gathers"]  # a draw, not the transitions' states
    assert "| celeba |" in out.with_suffix(".md").read_text()
    bad = run_cli(["benchmarks.data_path", "--small", "--repeats", "0", "--out", str(tmp_path / "bad.json")], cwd=REPO,
                  timeout=120)
    assert bad.returncode == 2 and "argument --repeats: '0' is not a whole number of at least 1" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad.json").exists()


def test_the_sample_memory_trend_sees_a_held_growth_and_not_the_per_batch_swings():
    import sys

    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from sample_memory import FLOAT_IMAGE, summarise, trend

    rng = np.random.default_rng(0)
    t = np.arange(0.0, 1000.0, 0.5)
    swings = rng.uniform(0, 600e6, len(t))  # a batch's working memory, coming and going
    flat = trend(list(zip(t, (800e6 + swings).astype(int))))
    growing = trend(list(zip(t, (800e6 + swings + 614e6 * t / t[-1]).astype(int))))
    assert abs(flat["trend_bytes"]) < 3 * flat["trend_stderr_bytes"] + 1  # nothing held
    assert 0.8 * 0.9 * 614e6 < growing["trend_bytes"] < 1.2 * 0.9 * 614e6  # 90% of the run fitted
    rows = [{"n": n, "format": fmt, "batch_size": 500, "peak_rss_bytes": peak, "trend_bytes": held}
            for n, peak, held in ((1000, 1_400_000_000, 0), (50_000, 1_600_000_000, 5_000_000)) for fmt in ("png", "npz")]
    rows.append({"n": 10_000, "format": "npz", "batch_size": 2000, "peak_rss_bytes": 3_900_000_000, "trend_bytes": 0})
    summary = summarise(rows, 50_000)
    assert summary["holds_one_batch"] and summary["peak_growth_npz_bytes"] == 200_000_000
    assert summary["float_samples_bytes_if_held"] == 50_000 * FLOAT_IMAGE
    rows[3]["trend_bytes"] = 500_000_000  # the npz run kept its samples
    assert not summarise(rows, 50_000)["holds_one_batch"]


def test_the_digits_variants_summary_reads_fid_curves_and_their_drift(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from digits_variants import (
        VARIANTS,
        failure_line,
        fid_curve,
        markdown,
        merge,
        parse_variant,
        run_summary,
        variant_summary,
    )

    from sftrl.config import load

    for overrides in VARIANTS.values():  # every variant is a valid config
        load(REPO / "configs" / "digits.yaml", overrides)
    # A failed run is known by its own error line, not by the Ray log lines printed after it.
    assert failure_line("x\nerror: no rollout worker came back\n(ComponentActor) ray.exceptions.Boom\n") == \
        "error: no rollout worker came back"
    assert failure_line("Traceback ...\nValueError: bad\n") == "ValueError: bad" and failure_line("") == ""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(row) for row in (
        {"iteration": 0, "eval/fid": 18.0}, {"iteration": 10, "policy/policy_loss": 0.1},
        {"iteration": 50, "eval/fid": 7.0}, {"iteration": 100, "eval/fid": 6.0}, {"iteration": 150, "eval/fid": 7.8})) + "\n")
    run = run_summary(fid_curve(metrics))
    assert run["curve"] == [(0, 18.0), (50, 7.0), (100, 6.0), (150, 7.8)]
    assert (run["best_fid"], run["best_iteration"], run["last_fid"]) == (6.0, 100, 7.8)
    assert abs(run["drift"] - 0.3) < 1e-12
    summary = variant_summary([run, {**run, "best_fid": 8.0, "last_fid": 8.0, "drift": 0.0}])
    assert summary["best_fid"]["mean"] == 7.0 and summary["drift"]["values"] == [run["drift"], 0.0]
    table = markdown({"sft-pg": {"overrides": [], "runs": [run, run], "summary": summary},
                      "lora-r4": {"overrides": ["model.lora_rank=4"], "runs": [], "error": "peft missing"}})
    assert "| sft-pg | `(digits.yaml)` | 2 | 0: 18.00, 50: 7.00, 100: 6.00, 150: 7.80 | 7.00 ± 1.41 |" in table
    assert "failed: peft missing" in table
    assert parse_variant("lora-r4") == ("lora-r4", VARIANTS["lora-r4"])
    assert parse_variant("kl=algo.name=sft-pg-kl,algo.sft-pg-kl.beta=0.1") == ("kl", ["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.1"])
    with pytest.raises(ValueError, match="NAME=KEY=VALUE"):
        parse_variant("no-such-variant")
    # two invocations' outputs join per variant and seed; the later run of a seed wins
    first = {"results": {"sft-pg": {"overrides": [], "runs": [{**run, "seed": 0}, {**run, "seed": 1}]},
                         "lora-r4": {"overrides": ["model.lora_rank=4"], "runs": [], "error": "peft missing"}}}
    second = {"results": {"sft-pg": {"overrides": [], "runs": [{**run, "seed": 1, "best_fid": 5.0}, {**run, "seed": 2}]}}}
    joined = merge([first, second])
    assert [r["seed"] for r in joined["sft-pg"]["runs"]] == [0, 1, 2]
    assert joined["sft-pg"]["summary"]["best_fid"]["values"] == [6.0, 5.0, 6.0]
    assert joined["lora-r4"]["error"] == "peft missing"
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    out = tmp_path / "out.json"
    refused = run_cli(["benchmarks.digits_variants", "--merge", str(bad), "--out", str(out)])
    assert refused.returncode == 2 and f"--merge {bad}: not a digits_variants output" in refused.stderr
    assert not out.exists()  # nothing written
    bad.write_text(json.dumps({"results": {"sft-pg": {"overrides": [], "runs": "oops"}}}))
    refused = run_cli(["benchmarks.digits_variants", "--merge", str(bad), "--out", str(out)])
    assert refused.returncode == 2 and "variant 'sft-pg' has no list of runs" in refused.stderr
    assert not out.exists()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(second))
    merged = run_cli(["benchmarks.digits_variants", "--merge", str(a), str(b), "--out", str(out)])
    assert merged.returncode == 0, merged.stderr
    assert [r["seed"] for r in json.loads(out.read_text())["results"]["sft-pg"]["runs"]] == [0, 1, 2]
    assert "| sft-pg |" in out.with_suffix(".md").read_text()
    assert not list(tmp_path.glob(".*.tmp"))  # written in place of a temporary file, none left over
    (tmp_path / "adir").mkdir()
    refused = run_cli(["benchmarks.digits_variants", "--seeds", "0", "--out", str(tmp_path / "adir")])
    assert refused.returncode == 2 and "is a directory; give the path of a .json file" in refused.stderr
    with pytest.raises(ValueError, match="another name"):
        merge([first, {"results": {"sft-pg": {"overrides": ["x=1"], "runs": []}}}])


def test_a_failed_digits_run_keeps_its_folder_and_names_it(tmp_path, monkeypatch):
    import subprocess
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import digits_variants

    def fails_after_one_evaluation(cmd, **kwargs):
        run_dir = Path(cmd[cmd.index("--run-dir") + 1])
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "eval/fid": 18.0}) + "\n")
        return subprocess.CompletedProcess(cmd, 1, "", f"error: 13 non-finite critic updates in a row in {run_dir}\n")

    monkeypatch.setattr(digits_variants.subprocess, "run", fails_after_one_evaluation)
    monkeypatch.setattr(digits_variants, "KEEP_FAILED", tmp_path / "kept")
    with pytest.raises(RuntimeError) as failed:
        digits_variants.run_one(["algo.policy_lr=1"], 0, tmp_path / "work", None)
    (kept,) = (tmp_path / "kept").iterdir()
    assert str(failed.value) == \
        f"error: 13 non-finite critic updates in a row in {kept} (FID 0: 18.00; its folder: {kept})"
    assert (kept / "metrics.jsonl").is_file() and not any((tmp_path / "work").iterdir())

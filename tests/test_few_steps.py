"""Issue 22's fewer-steps configs (T' = 5 and 2) and ``benchmarks/few_steps.py``.

The configs load and a drastically shortened run of each completes (``sftrl.run.main`` in this
process, ``ray.backend=local``);
the benchmark's summary and tables are checked on made-up rows, and its whole path (runs,
candidate starts, a failing variant recorded, not fatal) on a tiny run.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import REPO, run_cli
from sftrl.config import load

sys.path.insert(0, str(REPO / "benchmarks"))
import few_steps  # noqa: E402  (a script, not a package: found on its folder)

CONFIGS = {"swissroll-t5": ("swissroll", 5), "swissroll-t2": ("swissroll", 2), "gaussian-t2": ("gaussian", 2)}

# A run of a few seconds: tiny data, pretraining, iterations and evaluation, in one process.
SHORT = ["ray.backend=local", "data.num_train=1000", "pretrain.epochs=2", "trainer.iterations=4",
         "trainer.eval_every=0", "trainer.eval_samples=500", "trainer.eval_draws=2", "trainer.exact_w2_points=100",
         "trainer.log_every=2", "trainer.checkpoint_every=0", "algo.n_critic=2", "algo.batch_size=32"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fewer_steps_configs_load_with_their_data_and_steps(name):
    cfg = load(REPO / "configs" / f"{name}.yaml")
    data, steps = CONFIGS[name]
    assert (cfg.name, cfg.data.name, cfg.diffusion.steps) == (name, data, steps)
    assert name in few_steps.CONFIGS


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_shortened_run_of_each_config_completes(name, tmp_path):
    from sftrl.run import main as run_main

    run_dir = tmp_path / "run"  # in this process (ray.backend=local): no interpreter or Ray to start
    code = run_main([str(REPO / "configs" / f"{name}.yaml"), *SHORT, "trainer.eval_every=2", f"pretrain.cache_dir={tmp_path / 'cache'}",
                     "--run-dir", str(run_dir), "--no-progress"])
    assert code == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["iterations"] == 4 and report["config"]["diffusion"]["steps"] == CONFIGS[name][1]
    initial, tuned = report["evaluations"][0], report["evaluations"][-1]
    assert (initial["iteration"], tuned["iteration"]) == (0, 4)
    assert tuned["sw2_floor_mean"] > 0 and tuned["sw2_mean"] > 0
    assert (run_dir / "sampling_paths.png").is_file()
    row = few_steps.run_row(name, "fixed", 0, report, 12.5, few_steps.sw2_curve(run_dir / "metrics.jsonl"))
    assert [i for i, _ in row["curve"]] == [0, 2, 4]  # every evaluation, not only the first and last
    assert row["curve"][-1][1] == tuned["sw2_mean"]
    assert row["ratio"] == pytest.approx(tuned["sw2_mean"] / tuned["sw2_floor_mean"])
    assert row["initial_sw2"] == initial["sw2_mean"] and row["wall_s"] == 12.5


def made_up_row(config: str, variant: str, seed: int, sw2: float, floor: float, wall: float) -> dict:
    return {"config": config, "variant": variant, "seed": seed, "ok": True, "initial_sw2": 0.1, "sw2": sw2,
            "sw2_std": 0.001, "floor": floor, "floor_std": 0.0005, "ratio": sw2 / floor, "wall_s": wall,
            "fine_tune_s": wall - 50}


def test_summary_takes_mean_and_spread_over_seeds_and_keeps_failures_apart():
    rows = [made_up_row("swissroll-t5", "fixed", 0, 0.010, 0.008, 300.0),
            made_up_row("swissroll-t5", "fixed", 1, 0.012, 0.008, 320.0),
            made_up_row("swissroll-t5", "fixed", 2, 0.014, 0.008, 340.0),
            {"config": "swissroll-t5", "variant": "learned", "seed": 0, "ok": False,
             "error": "sftrl.run failed:\nerror: unknown key 'model.learn_variance'"},
            made_up_row("gaussian-t2", "fixed", 0, 0.0003, 0.0002, 200.0),
            {"config": "gaussian-t2", "variant": "fixed", "seed": 1, "ok": False, "error": "boom"}]
    t5, learned, gaussian = few_steps.summarise(rows)
    assert (t5["config"], t5["variant"], t5["seeds"], t5["failed"]) == ("swissroll-t5", "fixed", [0, 1, 2], {})
    assert t5["sw2_mean"] == pytest.approx(0.012) and t5["sw2_std"] == pytest.approx(0.002)  # sample std
    assert t5["ratio_mean"] == pytest.approx(1.5) and t5["ratio_max"] == pytest.approx(1.75)
    assert t5["wall_s_mean"] == pytest.approx(320.0) and t5["meets_target"]  # 1.5 <= 1.5
    assert learned["seeds"] == [] and math.isnan(learned["sw2_mean"]) and not learned["meets_target"]
    assert "unknown key" in learned["failed"]["0"]
    assert gaussian["seeds"] == [0] and gaussian["failed"] == {"1": "boom"}
    assert gaussian["sw2_std"] == 0.0 and gaussian["ratio_mean"] == pytest.approx(1.5)

    table = few_steps.results_table([t5, learned, gaussian]).splitlines()
    assert table[0].startswith("| config | variant | seeds | initial SW2 | fine-tuned SW2 | floor | ratio (max) |")
    assert table[2] == ("| swissroll-t5 | fixed | 3 | 10.0 ± 0 | 1.20 ± 0.200 | 0.800 ± 0 | 1.50 (1.75) "
                        "| 320 ± 20 | 270 ± 20 |")
    assert table[3].startswith("| swissroll-t5 | learned | 0 of 1 | failed: error: unknown key 'model.learn_variance' |")
    # the Gaussian cluster's numbers are 1e-4: three significant digits, not 0.03 and 0.02
    assert table[4].startswith("| gaussian-t2 | fixed | 1 (1 failed) | 10.0 ± 0 | 0.0300 ± 0 | 0.0200 ± 0 | 1.50 (1.50) |")


def test_candidates_table_shows_initial_and_fine_tuned_sw2_and_failures():
    candidates = [
        {"config": "swissroll-t2", "start": "strided", "sw2_mean": 0.39, "sw2_std": 0.01, "sw2_floor_mean": 0.0066,
         "fine_tuned": {"sw2": 0.05, "ratio": 7.5}},
        {"config": "swissroll-t2", "start": "trained at T'", "sw2_mean": 0.2, "sw2_std": 0.02, "sw2_floor_mean": 0.0066},
        {"config": "swissroll-t2", "start": "fastdpm", "error": "ConfigError: 'diffusion.beta_schedule'"},
    ]
    lines = few_steps.candidates_table(candidates).splitlines()
    assert lines[2] == "| swissroll-t2 | strided | 39.0 ± 1.00 | 0.660 | 5.00 (7.50) |"
    assert lines[3] == "| swissroll-t2 | trained at T' | 20.0 ± 2.00 | 0.660 | - |"
    assert lines[4] == "| swissroll-t2 | fastdpm | failed: ConfigError: 'diffusion.beta_schedule' | | |"


def test_variants_are_named_override_sets():
    assert few_steps.parse_variant("fixed") == ("fixed", ["model.learn_variance=false", "model.variance_lr=null",
                                                          "algo.entropy_coef=0"])
    for config in CONFIGS:  # every few-step config takes the "fixed" variant (a config's learned-std keys cleared)
        load(REPO / "configs" / f"{config}.yaml", few_steps.VARIANTS["fixed"])
    assert few_steps.parse_variant("learned") == ("learned", ["model.learn_variance=true"])
    assert few_steps.parse_variant("lr=algo.policy_lr=1e-4,algo.n_generator=3") == (
        "lr", ["algo.policy_lr=1e-4", "algo.n_generator=3"])
    with pytest.raises(ValueError, match="NAME=KEY=VALUE"):
        few_steps.parse_variant("nonsense")


def test_learned_variance_gets_a_starting_std_only_where_a_step_is_deterministic():
    learned = ["model.learn_variance=true"]
    floor = f"diffusion.final_step_std={few_steps.LEARNED_FINAL_STEP_STD}"
    assert few_steps.with_start_std(learned, [0.0059, 0.0], 0.0) == [*learned, floor]
    assert few_steps.with_start_std(learned, [0.1, 0.0059], 0.0) == learned  # every step has a sigma
    assert few_steps.with_start_std(learned, [0.0059, 0.0], 0.002) == learned  # the config sets one
    assert few_steps.with_start_std([], [0.0059, 0.0], 0.0) == []  # fixed variances need none
    mine = [*learned, "diffusion.final_step_std=0.01"]
    assert few_steps.with_start_std(mine, [0.0059, 0.0], 0.0) == mine


def test_candidate_starts_fill_in_the_configs_steps():
    starts = few_steps.candidate_overrides("swissroll-t2", [])
    assert "diffusion.num_train_steps=2" in starts["DDPM trained with T = T'"]
    for overrides in starts.values():  # every start is a valid config at T' = 2
        load(REPO / "configs" / "swissroll-t2.yaml", overrides)


def test_the_benchmark_records_a_failing_variant_and_goes_on(tmp_path):
    out = tmp_path / "results" / "few-steps.json"
    result = run_cli(["benchmarks.few_steps", "--configs", "gaussian-t2", "--seeds", "0", "--variants", "fixed",
                      "broken=model.no_such_key=1", "--no-candidates", "--cache-dir", str(tmp_path / "cache"),
                      *[f"--set={o}" for o in SHORT], "--out", str(out), "--keep-failed", str(tmp_path / "failed")],
                     cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    fixed, broken = report["summary"]
    assert fixed["variant"] == "fixed" and fixed["seeds"] == [0] and fixed["ratio_mean"] > 0
    assert broken["variant"] == "broken" and broken["seeds"] == [] and "no_such_key" in broken["failed"]["0"]
    assert report["pictures"] == {"gaussian-t2": {"fixed": "few-steps-gaussian-t2-paths.png"}}
    assert (out.parent / "few-steps-gaussian-t2-paths.png").is_file()
    assert "| gaussian-t2 | broken | 0 of 1 | failed:" in out.with_suffix(".md").read_text()


def test_outputs_run_side_by_side_merge_into_one_report(tmp_path):
    def output(rows, seeds, note, wall):
        return {"note": note, "configs": ["gaussian-t2"], "seeds": seeds, "variants": {"lr": ["algo.policy_lr=1e-4"]},
                "set": ["ray.backend=local"], "runs": rows, "candidates": [], "benchmark_wall_s": wall,
                "pictures": {"gaussian-t2": {"lr": "few-steps-gaussian-t2-lr-paths.png"}} if 0 in seeds else {},
                "commands": [f"python benchmarks/few_steps.py --seeds {seeds[0]}"]}

    stopped = {"config": "gaussian-t2", "variant": "lr", "seed": 1, "ok": False, "error": "stopped by hand"}
    first = output([made_up_row("gaussian-t2", "lr", 0, 0.0003, 0.0002, 100.0), stopped], [0, 1], "first.", 100.0)
    rerun = output([made_up_row("gaussian-t2", "lr", 1, 0.0004, 0.0002, 120.0)], [1], "", 120.0)
    third = output([made_up_row("gaussian-t2", "lr", 2, 0.0002, 0.0002, 90.0)], [2], "", 90.0)
    joined = few_steps.merge([first, rerun, third])
    assert [(r["seed"], r["ok"]) for r in joined["runs"]] == [(0, True), (1, True), (2, True)]  # the rerun replaces
    (summary,) = joined["summary"]
    assert summary["seeds"] == [0, 1, 2] and summary["failed"] == {} and summary["ratio_mean"] == pytest.approx(1.5)
    assert joined["seeds"] == [0, 1, 2] and joined["set"] == ["ray.backend=local"] and joined["note"] == "first."
    assert joined["benchmark_wall_s"] == 310.0 and len(joined["commands"]) == 3
    assert joined["pictures"] == {"gaussian-t2": {"lr": "few-steps-gaussian-t2-lr-paths.png"}}
    assert few_steps.merge([first], note="mine")["note"] == "mine"

    paths = []
    for i, out in enumerate((first, rerun, third)):
        paths.append(tmp_path / f"part-{i}.json")
        paths[-1].write_text(json.dumps(out))
    merged = tmp_path / "merged.json"
    done = run_cli(["benchmarks.few_steps", "--merge", *map(str, paths), "--out", str(merged)], cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(merged.read_text())["summary"][0]["seeds"] == [0, 1, 2]
    assert "| gaussian-t2 | lr | 3 |" in merged.with_suffix(".md").read_text()
    # a file that is not a few_steps output is named, and nothing is written
    (tmp_path / "bad.json").write_text('{"results": {}}')
    refused = run_cli(["benchmarks.few_steps", "--merge", str(paths[0]), str(tmp_path / "bad.json"),
                       "--out", str(tmp_path / "none.json")], cwd=REPO)
    assert refused.returncode == 2 and "bad.json: not a few_steps output (no 'runs'" in refused.stderr
    assert not (tmp_path / "none.json").exists()
    # an --out that is a directory is refused before anything runs or is written
    (tmp_path / "adir").mkdir()
    refused = run_cli(["benchmarks.few_steps", "--merge", str(paths[0]), "--out", str(tmp_path / "adir")], cwd=REPO)
    assert refused.returncode == 2 and "is a directory; give the path of a .json file" in refused.stderr


def test_a_failed_runs_folder_is_kept_with_the_curve_it_reached(tmp_path):
    run_dir = tmp_path / "work" / "gaussian-t2-lr-0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in (
        {"iteration": 0, "eval/sw2_mean": 0.26}, {"iteration": 50, "policy/grad_norm": 4.5e4},
        {"iteration": 500, "eval/sw2_mean": 0.01})) + "\n")
    (tmp_path / "keep" / "gaussian-t2-lr-0").mkdir(parents=True)  # an earlier invocation's: not overwritten
    kept = few_steps.keep_failed_run(run_dir, tmp_path / "keep")
    assert kept == {"kept_at": str(tmp_path / "keep" / "gaussian-t2-lr-0-2"), "curve": [(0, 0.26), (500, 0.01)]}
    assert not run_dir.exists() and (tmp_path / "keep" / "gaussian-t2-lr-0-2" / "metrics.jsonl").is_file()
    assert few_steps.keep_failed_run(tmp_path / "work" / "never-made", tmp_path / "keep") == {}
    # a stopped run's resume command names the folder where it now is
    stopped = f"stopped at iteration 3848; continue with: python -m sftrl.run --run-dir {run_dir} --resume auto"
    assert few_steps.where_kept(stopped, run_dir, kept) == \
        f"stopped at iteration 3848; continue with: python -m sftrl.run --run-dir {kept['kept_at']} --resume auto"
    assert few_steps.where_kept(stopped, run_dir, {}) == stopped
    # a folder that cannot be kept is said in the row; the benchmark goes on
    (tmp_path / "work" / "again").mkdir()
    (tmp_path / "file").write_text("not a folder")
    kept = few_steps.keep_failed_run(tmp_path / "work" / "again", tmp_path / "file" / "keep")
    assert kept["kept_at"] is None and "could not keep" in kept["keep_error"]

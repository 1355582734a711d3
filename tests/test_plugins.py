"""Algorithm plug-ins from installed packages: discovery by entry point, settings from
``algo.<name>``, one-line errors, and the README's example plug-in (``examples/plugin``)
installed with pip and run through ``python -m sftrl.run``."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import AWR, AWR_MODULE, EXAMPLE, REPO, fake_distribution, run_cli
from sftrl.algos import ALGORITHMS, PluginError, algorithm_class, algorithm_names, make_algorithm
from sftrl.config import load
from sftrl.configtools import ConfigError, Sections, dump_yaml, to_dict

SMOKE = REPO / "configs" / "smoke.yaml"

GOOD = '''
import dataclasses
from sftrl.algos import PolicyAlgorithm
from sftrl.configtools import doc_field


@dataclasses.dataclass(frozen=True)
class Settings:
    scale: float = doc_field(1.0, "A scale.")


class Good(PolicyAlgorithm):
    data = "samples"
    settings_class = Settings

    def update(self, ctx, data):
        return []
'''


# -- discovery -------------------------------------------------------------------------------------


def test_listing_reads_entry_points_without_importing_the_plugins(site):
    fake_distribution(site, "lazy-dist", {"lazy": "lazy_plugin:Good"}, {"lazy_plugin": GOOD})
    assert algorithm_names() == ["ppo", "sft", "sft-pg", "sft-pg-kl", "lazy"]
    assert "lazy_plugin" not in sys.modules
    assert "lazy" not in ALGORITHMS
    cls = algorithm_class("lazy")
    assert "lazy_plugin" in sys.modules and cls.name == "lazy" and ALGORITHMS["lazy"] is cls


def test_built_ins_are_found_without_reading_entry_points(site, monkeypatch):
    def no_discovery():
        raise AssertionError("entry points read for a built-in name")

    monkeypatch.setattr("sftrl.algos.base._entry_points", no_discovery)
    assert load(SMOKE, ["algo.name=ppo"]).algo.name == "ppo"
    assert make_algorithm("sft-pg", load(SMOKE).algo).name == "sft-pg"


def test_an_unknown_name_lists_the_built_ins_and_the_installed_plugins(site):
    fake_distribution(site, "lazy-dist", {"lazy": "lazy_plugin:Good"}, {"lazy_plugin": GOOD})
    with pytest.raises(ConfigError) as err:
        load(SMOKE, ["algo.name=reinforce"])
    assert str(err.value) == (
        "override 'algo.name=reinforce': 'algo.name' = 'reinforce' is invalid: unknown algorithm 'reinforce'; "
        "valid: ppo, sft, sft-pg, sft-pg-kl, lazy (plug-ins add names: entry-point group 'sftrl.algorithms')"
    )


BROKEN = {
    "import": ("broken_import", "import not_a_module_anywhere\n", "broken_import:Algo",
               "failed to load: ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    "attribute": ("broken_attribute", "X = 1\n", "broken_attribute:Algo",
                  "failed to load: AttributeError: module 'broken_attribute' has no attribute 'Algo'"),
    "not a class": ("broken_object", "Algo = 1\n", "broken_object:Algo",
                    "is not a usable algorithm: 1 is not a subclass of sftrl.algos.PolicyAlgorithm"),
    "abstract": ("broken_abstract", "from sftrl.algos import PolicyAlgorithm\n\n\nclass Algo(PolicyAlgorithm):\n"
                 "    data = 'samples'\n", "broken_abstract:Algo", "is not a usable algorithm: Algo does not implement update()"),
    "no data": ("broken_data", GOOD.replace('data = "samples"', 'data = "some"'), "broken_data:Good",
                "is not a usable algorithm: Good.data is 'some', not one of 'samples', 'all', 'none'"),
    "settings": ("broken_settings", GOOD.replace("frozen=True", "frozen=False").replace('doc_field(1.0, "A scale.")', "1.0"),
                 "broken_settings:Good", "is not a usable algorithm: settings_class Settings: Settings is not frozen "
                 "(use @dataclass(frozen=True)); scale: no doc (declare it with doc_field)"),
}


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_plugin_is_one_line_naming_it_and_the_built_ins_still_work(site, case):
    module, source, target, problem = case
    fake_distribution(site, "broken-dist", {"broken": target}, {module: source})
    with pytest.raises(ConfigError) as err:
        load(SMOKE, ["algo.name=broken"])
    assert str(err.value) == (f"override 'algo.name=broken': 'algo.name' = 'broken' is invalid: plug-in "
                              f"'broken = {target}' (distribution broken-dist 0.1) {problem}")
    assert "\n" not in str(err.value)
    assert load(SMOKE, ["algo.name=ppo"]).algo.name == "ppo"  # built-ins unaffected
    assert "broken" in algorithm_names()  # listing does not import it


def test_two_plugins_claiming_one_name_is_an_error_naming_both(site):
    fake_distribution(site, "first-dist", {"twin": "twin_a:Good"}, {"twin_a": GOOD})
    fake_distribution(site, "second-dist", {"twin": "twin_b:Good"}, {"twin_b": GOOD})
    with pytest.raises(PluginError) as err:
        algorithm_class("twin")
    assert str(err.value) == (
        "algorithm 'twin' is claimed by 2 plug-ins: plug-in 'twin = twin_a:Good' (distribution first-dist 0.1); "
        "plug-in 'twin = twin_b:Good' (distribution second-dist 0.1); uninstall all but one"
    )
    assert "twin_a" not in sys.modules and "twin_b" not in sys.modules


# -- settings: algo.<name> -------------------------------------------------------------------------


def test_a_plugins_settings_come_from_its_section_and_reach_the_algorithm(awr, tmp_path):
    cfg = load(SMOKE, [f"algo.name={AWR}", f"algo.{AWR}.temperature=0.5"])
    settings_class = algorithm_class(AWR).settings_class
    assert cfg.algo.sections == Sections({AWR: settings_class(temperature=0.5, max_weight=20.0)})
    algorithm = make_algorithm(AWR, cfg.algo)
    assert algorithm.settings is cfg.algo.sections[AWR]
    assert to_dict(cfg)["algo"][AWR] == {"temperature": 0.5, "max_weight": 20.0}
    # The resolved config round-trips through YAML (config.yaml) and pickles (Ray, checkpoints).
    dump_yaml(cfg, tmp_path / "config.yaml")
    assert load(tmp_path / "config.yaml") == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg and hash(pickle.loads(pickle.dumps(cfg))) == hash(cfg)


def test_the_selected_plugins_section_is_resolved_from_defaults_when_absent(awr):
    cfg = load(SMOKE, [f"algo.name={AWR}"])
    assert to_dict(cfg)["algo"][AWR] == {"temperature": 1.0, "max_weight": 20.0}
    assert make_algorithm(AWR, cfg.algo).settings.temperature == 1.0
    assert AWR not in to_dict(load(SMOKE))["algo"]  # built-ins: the flat keys, as before


def test_a_section_of_another_algorithm_is_checked_and_kept(awr, tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(SMOKE.read_text().replace("  name: sft-pg\n", f"  name: ppo\n  {AWR}:\n    max_weight: 3\n"))
    cfg = load(path)
    assert cfg.algo.name == "ppo" and cfg.algo.sections[AWR].max_weight == 3.0
    path.write_text(SMOKE.read_text().replace("  name: sft-pg\n", f"  name: ppo\n  {AWR}:\n    max_weight: 0.5\n"))
    with pytest.raises(ConfigError, match=f"'algo.{AWR}.max_weight' = 0.5 is invalid: must be >= 1"):
        load(path)


BAD_SETTINGS = [
    (f"algo.{AWR}.temperature=0", f"'algo.{AWR}.temperature' = 0.0 is invalid: must be > 0"),
    (f"algo.{AWR}.temperature=hot", f"'algo.{AWR}.temperature' must be a float, got 'hot' (str)"),
    (f"algo.{AWR}.temperature=.nan", f"'algo.{AWR}.temperature' = nan is invalid: must be a finite number"),
    (f"algo.{AWR}.temprature=1", f"unknown key 'algo.{AWR}.temprature' — valid keys under 'algo.{AWR}': "
                                 "temperature, max_weight; did you mean 'temperature'?"),
    (f"algo.{AWR}=3", f"'algo.{AWR}' must be a mapping (a section with keys temperature, max_weight), got 3 (int)"),
    ("algo.sft-awk.temperature=1", "unknown key 'algo.sft-awk' — valid keys under 'algo': name, "),
    ("algo.sft-awk.temperature=1", "; or a section named after an algorithm: ppo, sft, sft-pg, sft-pg-kl, sft-awr; "
                                   "did you mean 'sft-awr'?"),
    ("algo.sft-pg.temperature=1", "'algo.sft-pg' is invalid: algorithm 'sft-pg' takes no settings section"),
]


@pytest.mark.parametrize(("override", "message"), BAD_SETTINGS)
def test_bad_settings_are_one_line_errors_naming_the_key(awr, override, message):
    with pytest.raises(ConfigError) as err:
        load(SMOKE, [f"algo.name={AWR}", override])
    assert str(err.value).startswith(f"override '{override}': ")
    assert message in str(err.value)


def test_the_old_flat_keys_of_the_built_ins_still_work():
    cfg = load(SMOKE, ["algo.name=ppo", "algo.ppo_clip=0.3", "algo.ppo_epochs=3"])
    assert make_algorithm("ppo", cfg.algo).settings.ppo_clip == 0.3
    assert cfg.algo.sections == Sections() and to_dict(cfg)["algo"]["ppo_epochs"] == 3


# -- the README's plug-in, installed with pip and run ----------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``examples/plugin`` installed by pip into a directory of its own (offline, no deps)."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "src"
    shutil.copytree(EXAMPLE, source)  # pip builds in the source tree: not in the repository's
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(root / "site"), str(source)], check=True, capture_output=True)
    return root / "site"


def run_with(site: Path, args: list[str], cache_dir: Path) -> subprocess.CompletedProcess:
    return run_cli(["sftrl.run", *args, f"pretrain.cache_dir={cache_dir}", "--no-progress"],
                   env={"PYTHONPATH": str(site)}, timeout=300)


def test_the_example_plugin_runs_through_sftrl_run_and_resumes(installed, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_with(installed, [str(SMOKE), f"algo.name={AWR}", f"algo.{AWR}.temperature=1e-4",
                                  f"algo.{AWR}.max_weight=1.5", "trainer.iterations=2", "trainer.log_every=1",
                                  "trainer.eval_samples=200", "trainer.exact_w2_points=0", "ray.backend=local",
                                  "--run-dir", str(run_dir)], cache_dir)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = [m["policy/awr_weight_max"] for m in lines if "policy/awr_weight_max" in m]
    # exp(A / 1e-4) is far above the cap wherever the advantage is positive: the cap, 1.5, is
    # the largest weight, so both settings reached the algorithm.
    assert len(weights) == 2 and max(weights) == 1.5
    assert (run_dir / "config.yaml").read_text().count(f"  {AWR}:\n    temperature: 0.0001\n    max_weight: 1.5") == 1
    # A resumed run reads the plug-in's name and settings from the run's config.yaml.
    result = run_with(installed, ["--run-dir", str(run_dir), "--resume", "auto", "trainer.iterations=3"], cache_dir)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["iteration"] == 3


@pytest.mark.parametrize(("override", "message"), [BAD_SETTINGS[0], BAD_SETTINGS[3]])
def test_a_bad_plugin_setting_on_the_command_line_is_one_line_exit_2(installed, cache_dir, tmp_path, override,
                                                                      message):
    result = run_with(installed, [str(SMOKE), f"algo.name={AWR}", override, "--run-dir", str(tmp_path / "run")],
                      cache_dir)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_broken_plugin_on_the_command_line_is_one_line_exit_2(site, cache_dir, tmp_path):
    module, source, target, problem = BROKEN["import"]
    fake_distribution(site, "broken-dist", {"broken": target}, {module: source})
    result = run_with(site, [str(SMOKE), "algo.name=broken", "--run-dir", str(tmp_path / "run")], cache_dir)
    assert result.returncode == 2
    assert result.stderr == (f"error: override 'algo.name=broken': 'algo.name' = 'broken' is invalid: plug-in "
                             f"'broken = {target}' (distribution broken-dist 0.1) {problem}\n")


def test_the_examples_config_lines_select_the_plugin_and_set_its_settings(awr):
    cfg = load(EXAMPLE / "config.yaml")
    assert cfg.algo.name == AWR and make_algorithm(AWR, cfg.algo).settings.temperature == 0.5
    command_line = load(REPO / "configs" / "swissroll.yaml", [f"algo.name={AWR}", f"algo.{AWR}.temperature=0.5"])
    assert command_line.algo.sections == cfg.algo.sections


def test_the_readme_quotes_the_example_plugin_verbatim():
    readme = (REPO / "README.md").read_text()
    assert "examples/plugin/sftrl_awr.py" in readme, "the README's plug-in section is gone"
    for name in ("pyproject.toml", f"{AWR_MODULE}.py", "config.yaml"):
        assert (EXAMPLE / name).read_text().rstrip() + "\n```" in readme, name

"""The cluster examples run as shipped.

Every ``ray job submit`` / ``python -m sftrl.run`` command in ``cluster/`` and in README.md's code
blocks is loaded through sftrl's own config loader with its overrides, and what it reserves
(``resource_asks`` and ``placement_bundles``, the functions the run itself places with, the
driver's GPU included) is checked against the cluster it names: in all, and bundle by bundle on
that cluster's nodes. A job command names its cluster in a ``cluster: PATH`` comment just above it
(``rayjob.yaml``'s entrypoint runs on the cluster of its own file); a plain command starts Ray in
its own process on the README's machine. The image ``rayjob.yaml`` runs is the one
``cluster/Dockerfile`` builds, and ``ray-cluster.yaml``'s nodes install sftrl from this checkout.
No Ray, no network: YAML, shell words and arithmetic.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from conftest import AWR
from sftrl.config import Config, load
from sftrl.distributed.system import (
    DRIVER_NUM_GPUS,
    NOSET_CUDA_ENV,
    RAY_JOB_CONFIG_ENV,
    check_resources,
    driver_num_gpus,
    placement_bundles,
    resource_asks,
    unplaced_message,
    unreserved_driver_gpu,
)
from sftrl.run import parse_args

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
RAY_CLUSTER = "cluster/ray-cluster.yaml"
RAYJOB = "cluster/rayjob.yaml"
LOCAL_HEAD = "cluster/start-local-head.sh"
# The machine the README measures on and starts a local head on (its "2 CPU cores"), no GPU: the
# cluster of cluster/start-local-head.sh and of every command that starts Ray in its own process.
README_MACHINE = {"CPU": 2.0, "GPU": 0.0}
IN_PROCESS = "in-process Ray on the README's machine"
# What ray-cluster.yaml's instance types have (AWS): its stated node resources must match.
INSTANCE_TYPES = {"m5.2xlarge": {"CPU": 8.0, "GPU": 0.0}, "g5.xlarge": {"CPU": 4.0, "GPU": 1.0}}
# ray job submit's options this test understands; any other fails it rather than being skipped.
SUBMIT_OPTIONS = ("--address", "--working-dir", "--entrypoint-num-gpus", "--entrypoint-num-cpus")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Nodes (each ``{CPU, GPU}``, the head first) and the absolute paths every node sees alike
    (empty on a single node, where every path is shared)."""

    name: str
    nodes: tuple[dict[str, float], ...]
    shared: tuple[str, ...] = ()

    def total(self, resource: str) -> float:
        return sum(node.get(resource, 0.0) for node in self.nodes)


@dataclasses.dataclass
class Command:
    where: str  # file:line
    cluster: str  # a key of clusters(), or IN_PROCESS
    argv: list[str]


def read_yaml(relative: str):
    return yaml.safe_load((REPO / relative).read_text())


def ray_up_cluster() -> Cluster:
    """ray-cluster.yaml's head and each worker type's min_workers (up from the start, so the run
    need not wait on the autoscaler), within max_workers."""
    spec = read_yaml(RAY_CLUSTER)
    types = spec["available_node_types"]
    head = types[spec["head_node_type"]]
    nodes = [head["resources"]]
    for name, node_type in types.items():
        if name != spec["head_node_type"]:
            assert node_type["min_workers"] <= node_type["max_workers"] <= spec["max_workers"], name
            nodes += [node_type["resources"]] * node_type["min_workers"]
    home = f"/home/{spec['auth']['ssh_user']}"
    shared = tuple(target.replace("~", home, 1) for target in spec["file_mounts"])
    return Cluster(RAY_CLUSTER, tuple({r: float(n.get(r, 0)) for r in ("CPU", "GPU")} for n in nodes), shared)


def pod_resources(template: dict) -> dict[str, float]:
    limits = template["spec"]["containers"][0]["resources"]["limits"]
    return {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}


def pod_mounts(template: dict) -> set[str]:
    return {m["mountPath"] for m in template["spec"]["containers"][0].get("volumeMounts", [])}


def rayjob_cluster() -> Cluster:
    """The RayJob's head pod and each worker group's replicas (KubeRay gives Ray the pods' CPU and
    GPU limits); shared: the volumes every pod mounts."""
    spec = read_yaml(RAYJOB)["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]
    nodes = [pod_resources(head)]
    shared = pod_mounts(head)
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        nodes += [pod_resources(group["template"])] * group["replicas"]
        shared &= pod_mounts(group["template"])
    return Cluster(RAYJOB, tuple(nodes), tuple(sorted(shared)))


def clusters() -> dict[str, Cluster]:
    return {
        RAY_CLUSTER: ray_up_cluster(),
        RAYJOB: rayjob_cluster(),
        LOCAL_HEAD: Cluster(LOCAL_HEAD, (README_MACHINE,)),
        IN_PROCESS: Cluster(IN_PROCESS, (README_MACHINE,)),
    }


COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:ray job submit|python -m sftrl\.run)\b")
MARKER = re.compile(r"^cluster:\s*(\S+)")


def commands_in(relative: str) -> list[Command]:
    """The commands of a file: in README.md its code blocks' lines, elsewhere its comment lines
    (``\\`` continuations joined), each with the ``cluster:`` marker above it."""
    lines = (REPO / relative).read_text().splitlines()
    markdown = relative.endswith(".md")
    found: list[Command] = []
    in_block, marker, pending, start = False, None, "", 0
    for number, raw in enumerate(lines, 1):
        if markdown and raw.startswith("```"):
            in_block, marker = not in_block, None
            continue
        if markdown and not in_block:
            continue
        text = raw.strip()
        if not markdown:
            if not text.startswith("#"):
                continue
            text = text.lstrip("#").strip()
        elif text.startswith("#"):
            text = text.lstrip("#").strip()
            if not MARKER.match(text):
                continue
        if not pending:
            start = number
        pending += " " + text.removesuffix("\\").strip()
        if text.endswith("\\"):
            continue
        logical, pending = pending.strip(), ""
        if (m := MARKER.match(logical)) is not None:
            marker = m.group(1)
        elif COMMAND.match(logical):
            cluster = marker if "ray job submit" in logical else IN_PROCESS
            assert cluster is not None, f"{relative}:{start}: a job command without a 'cluster:' comment above it"
            found.append(Command(f"{relative}:{start}", cluster, shlex.split(logical, comments=True)))
            marker = None
    return found


def rayjob_command() -> Command:
    spec = read_yaml(RAYJOB)["spec"]
    argv = ["ray", "job", "submit"]
    if "entrypointNumGpus" in spec:
        argv += ["--entrypoint-num-gpus", str(spec["entrypointNumGpus"])]
    if "entrypointNumCpus" in spec:
        argv += ["--entrypoint-num-cpus", str(spec["entrypointNumCpus"])]
    return Command(f"{RAYJOB}:spec.entrypoint", RAYJOB, [*argv, "--", *shlex.split(spec["entrypoint"])])


def all_commands() -> list[Command]:
    files = ["README.md", *(str(p.relative_to(REPO)) for p in sorted(CLUSTER_DIR.glob("*.sh")))]
    files += [str(p.relative_to(REPO)) for p in sorted(CLUSTER_DIR.glob("*.yaml"))]
    return [c for f in files for c in commands_in(f)] + [rayjob_command()]


def is_job(argv: list[str]) -> bool:
    return without_env(argv)[:3] == ["ray", "job", "submit"]


def without_env(argv: list[str]) -> list[str]:
    """``argv`` without its leading ``NAME=value`` words."""
    while argv and re.match(r"^[A-Z_]+=", argv[0]):
        argv = argv[1:]
    return argv


def split_submit(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``(ray job submit's options, the entrypoint)``; a plain command: ``({}, argv)``."""
    argv = without_env(argv)
    if not is_job(argv):
        return {}, argv
    options, rest = {}, argv[3:]
    while rest[0] != "--":
        option, value, *rest = rest
        assert option in SUBMIT_OPTIONS, f"ray job submit option {option} (this test knows {SUBMIT_OPTIONS})"
        options[option] = value
    return options, rest[1:]


def loaded(entrypoint: list[str]):
    assert entrypoint[:3] in (["python", "-m", "sftrl.run"], ["python3", "-m", "sftrl.run"]), entrypoint
    args = parse_args(entrypoint[3:])
    if args.config is None:
        return args, None  # --resume with the run's own config: nothing new is asked
    path = REPO / args.config  # `--working-dir .` or the installed package's configs: the same files
    assert path.is_file(), f"config {args.config} is not in the repository"
    return args, load(path, args.overrides)


def driver_counted(cfg: Config, sees_gpu: bool, monkeypatch) -> float:
    """What sftrl counts for this command's driver in a Ray job, on a node where it sees a GPU or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: sees_gpu)
    return driver_num_gpus(cfg, {RAY_JOB_CONFIG_ENV: "{}"})


def fits(nodes: tuple[dict[str, float], ...], bundles: list[dict[str, float]], *, spread: bool) -> bool:
    """Place ``bundles`` in order, each on the first node with room (``spread``: on the node with
    the fewest bundles so far, as a SPREAD group prefers)."""
    free = [dict(n) for n in nodes]
    count = [0] * len(nodes)
    for bundle in bundles:
        room = [i for i, node in enumerate(free) if all(node.get(r, 0.0) + 1e-9 >= a for r, a in bundle.items())]
        if not room:
            return False
        i = min(room, key=lambda j: count[j]) if spread else room[0]
        count[i] += 1
        for r, a in bundle.items():
            free[i][r] = free[i].get(r, 0.0) - a
    return True


def check_command(command: Command, cluster: Cluster, monkeypatch) -> None:
    options, entrypoint = split_submit(command.argv)
    args, cfg = loaded(entrypoint)
    if cfg is None:
        assert cluster.name == IN_PROCESS, f"{command.where}: a job resuming without a config"
        return
    declared = float(options.get("--entrypoint-num-gpus", 0))
    # A driver with no entrypoint resources runs on the head; with a GPU asked, on a GPU node.
    sees_gpu = cfg.device != "cpu" and (declared > 0 or cluster.nodes[0]["GPU"] > 0)
    counted = driver_counted(cfg, sees_gpu, monkeypatch) if is_job(command.argv) else 0.0
    assert declared == counted, (f"{command.where}: the job reserves {declared:g} GPU for its driver, sftrl counts "
                                 f"{counted:g} (--entrypoint-num-gpus {DRIVER_NUM_GPUS:g} where it computes on one)")
    for resource, (amount, keys) in resource_asks(cfg, counted).items():
        have = cluster.total(resource)
        assert amount <= have + 1e-9, f"{command.where}: {resource} {amount:g} asked ({keys}), {cluster.name} has {have:g}"
    driver = [{"GPU": declared, "CPU": float(options.get("--entrypoint-num-cpus", 0))}]
    bundles = list(placement_bundles(cfg).values())
    orders = [bundles, bundles[::-1], sorted(bundles, key=lambda b: b.get("GPU", 0.0))]  # any order Ray takes
    for order in orders:
        for spread in (False, True):
            assert fits(cluster.nodes, driver + order, spread=spread), (
                f"{command.where}: the driver {driver[0]} and the bundles {order} do not fit the nodes of "
                f"{cluster.name} {cluster.nodes} (spread={spread})")
    if len(cluster.nodes) > 1:  # every node reads the data, and the run directory must outlive the job
        paths = {"data.path": cfg.data.path, "model.checkpoint": cfg.model.checkpoint, "--run-dir": args.run_dir}
        for key, path in paths.items():
            if path is not None:
                assert any(path.startswith(s.rstrip("/") + "/") for s in cluster.shared), (
                    f"{command.where}: {key} = {path} is not under a path every node of {cluster.name} "
                    f"shares {cluster.shared}")


def test_the_examples_hold_the_commands_the_test_checks():
    by_source = {c.where.split(":")[0] for c in all_commands()}
    assert {"README.md", RAY_CLUSTER, RAYJOB, LOCAL_HEAD} <= by_source
    named = {c.cluster for c in all_commands()}
    assert {RAY_CLUSTER, RAYJOB, LOCAL_HEAD, IN_PROCESS} <= named <= set(clusters())


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: c.where)
def test_every_command_asks_for_no_more_than_its_cluster_has(command, monkeypatch, request):
    if f"algo.name={AWR}" in command.argv:  # the README's plug-in example, which it installs first
        request.getfixturevalue("awr")
    check_command(command, clusters()[command.cluster], monkeypatch)


@pytest.mark.parametrize("cluster, line, message", [
    (RAYJOB, "ray job submit -- python -m sftrl.run configs/celeba.yaml rollout.num_workers=4 "
             "rollout.num_gpus_per_worker=1", r"GPU 4.6 asked .* has 4"),
    (RAY_CLUSTER, "ray job submit -- python -m sftrl.run configs/celeba.yaml rollout.num_workers=8 "
                  "rollout.num_gpus_per_worker=0.5", r"GPU 4.6 asked .* has 4"),
    (RAY_CLUSTER, "ray job submit -- python -m sftrl.run configs/celeba.yaml rollout.num_workers=4 "
                  "rollout.num_gpus_per_worker=0.5 ray.learner_num_gpus=0.5 ray.critic_num_gpus=0.5",
     r"data.path = data/celeba/img_align_celeba is not under a path every node"),
    (RAY_CLUSTER, "ray job submit --entrypoint-num-gpus 0.5 -- python -m sftrl.run configs/celeba.yaml",
     r"reserves 0.5 GPU for its driver, sftrl counts 1"),
])
def test_the_check_refuses_the_examples_as_they_were(cluster, line, message, monkeypatch):
    """The commands issue 21 found waiting forever (4.6 GPUs on 4), one whose data only the
    driver's node has, and a driver reserving less than sftrl counts, fail the check."""
    with pytest.raises(AssertionError, match=message):
        check_command(Command("old", cluster, shlex.split(line)), clusters()[cluster], monkeypatch)


def test_the_shipped_gpu_examples_use_every_gpu_of_their_cluster():
    """The sums the YAMLs' comments state: 1 (driver) + 4 x 0.5 + 0.5 + 0.5 = 4 GPUs of 4."""
    for command in all_commands():
        if command.cluster in (RAY_CLUSTER, RAYJOB):
            options, entrypoint = split_submit(command.argv)
            _, cfg = loaded(entrypoint)
            asked = resource_asks(cfg, float(options["--entrypoint-num-gpus"]))["GPU"][0]
            assert asked == clusters()[command.cluster].total("GPU") == 4.0, command.where


def test_a_joined_cluster_one_gpu_short_is_warned_naming_the_driver():
    cfg = load(REPO / "configs" / "celeba.yaml", ["rollout.num_workers=4", "rollout.num_gpus_per_worker=1",
                                                  "ray.learner_num_gpus=0.5", "ray.critic_num_gpus=0.5"])
    warning = check_resources(cfg, {"CPU": 40.0, "GPU": 5.0}, fixed=False, driver_gpus=1.0)
    assert warning is not None and re.search(
        r"GPU: 6 asked \(rollout.num_workers=4 x rollout.num_gpus_per_worker=1 \+ ray.learner_num_gpus=0.5 \+ "
        r"ray.critic_num_gpus=0.5 \+ the driver's 1 \(ray job submit --entrypoint-num-gpus\)\), the cluster has 5",
        warning)
    assert check_resources(cfg, {"CPU": 40.0, "GPU": 6.0}, fixed=False, driver_gpus=1.0) is None


def test_the_placement_timeout_names_what_is_missing():
    cfg = load(REPO / "configs" / "celeba.yaml", ["rollout.num_workers=4", "rollout.num_gpus_per_worker=1",
                                                  "ray.learner_num_gpus=0.5", "ray.critic_num_gpus=0.5"])
    bundles = placement_bundles(cfg)
    # The driver holds 1 of 4 GPUs: 3 are free, the actors ask 5.
    message = unplaced_message(cfg, bundles, {"CPU": 40.0, "GPU": 4.0}, {"CPU": 40.0, "GPU": 3.0}, driver_gpus=1.0)
    assert "\n" not in message
    assert re.search(r"within 600 s \(ray.placement_timeout_s\): missing GPU 2\. They ask CPU: 2 .*GPU: 6 "
                     r"\(.*\+ the driver's 1 .*\), in bundles of up to \{'CPU': 0.5, 'GPU': 1\.0\} per actor; "
                     r"the cluster has CPU 40, GPU 4 \(free: CPU 40, GPU 3\)", message), message
    # Enough free in all but on no node that fits a bundle: said so, with the bundle.
    fragmented = unplaced_message(cfg, bundles, {"CPU": 40.0, "GPU": 8.0}, {"CPU": 40.0, "GPU": 6.0})
    assert "enough is free in all, but not on nodes that fit each bundle (the largest: {'CPU': 0.5, 'GPU': 1.0})" \
        in fragmented


def test_a_job_driver_on_a_gpu_is_counted_and_warned_when_it_did_not_reserve_it(monkeypatch):
    cfg = load(REPO / "configs" / "celeba.yaml")
    assert driver_counted(cfg, True, monkeypatch) == DRIVER_NUM_GPUS
    assert driver_counted(cfg, False, monkeypatch) == 0.0
    assert driver_num_gpus(cfg, {}) == 0.0  # not a Ray job: Ray started here, or a script joining by address
    assert unreserved_driver_gpu({RAY_JOB_CONFIG_ENV: "{}"}) is None  # entrypoint resources declared
    warning = unreserved_driver_gpu({RAY_JOB_CONFIG_ENV: "{}", NOSET_CUDA_ENV: "1"})
    assert warning is not None and "--entrypoint-num-gpus 1 (KubeRay: entrypointNumGpus: 1)" in warning


def test_ray_job_supervisor_sets_the_variables_sftrl_reads():
    """The names sftrl reads are Ray's own (they are private to Ray, so checked here)."""
    from ray._private.accelerators.nvidia_gpu import NOSET_CUDA_VISIBLE_DEVICES_ENV_VAR
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    assert (RAY_JOB_CONFIG_ENV, NOSET_CUDA_ENV) == (RAY_JOB_CONFIG_JSON_ENV_VAR, NOSET_CUDA_VISIBLE_DEVICES_ENV_VAR)


# --- the image and the installs ---------------------------------------------------------------


def pyproject(key: str) -> str:
    """A ``key = "value"`` of pyproject.toml (no tomllib before Python 3.11)."""
    found = re.search(rf'^{key} = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert found is not None, key
    return found.group(1)


def readme_torch_pin() -> str:
    pins = set(re.findall(r'pip install "torch==([\d.]+)" -e', (REPO / "README.md").read_text()))
    assert len(pins) == 1, pins
    return pins.pop()


def dockerfile() -> str:
    return (CLUSTER_DIR / "Dockerfile").read_text()


def test_the_dockerfile_builds_the_image_rayjob_names_with_sftrl_installed():
    text = dockerfile()
    tags = set(re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", text))
    assert tags == {f"sftrl:{pyproject('version')}"}, tags
    tag = tags.pop()
    assert f"docker build -f cluster/Dockerfile -t {tag} ." in (REPO / "README.md").read_text()
    spec = read_yaml(RAYJOB)["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    assert {c["image"] for pod in pods for c in pod["spec"]["containers"]} == {tag}
    # Ray: the base image's, the RayJob's and ray-cluster.yaml's pin agree; Python fits pyproject.
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-py3(\d+)-gpu$", text, re.M)
    assert base is not None, "FROM rayproject/ray:VERSION-py3XX-gpu"
    assert spec["rayVersion"] == base.group(1)
    assert f'"ray[default]=={base.group(1)}"' in " ".join(read_yaml(RAY_CLUSTER)["setup_commands"])
    minimum = re.match(r">=3\.(\d+)", pyproject("requires-python"))
    assert minimum is not None and int(base.group(2)) >= int(minimum.group(1))
    # sftrl goes in as a package (configs included) from the copied checkout, torch pinned as the README pins it.
    copy = re.search(r"^COPY (?:--chown=\S+ )?\. (\S+)$", text, re.M)
    assert copy is not None, "COPY . DEST"
    install = re.search(r"^RUN pip install --no-cache-dir \"torch==([\d.]+)\" (\S+)", text, re.M)
    assert install is not None and install.group(1) == readme_torch_pin() and install.group(2) == copy.group(1)


def test_dockerignore_keeps_what_the_package_build_needs():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    # The project file, its readme, its packages' folders (pyproject's packages.find) and the
    # configs that sftrl/configs links to.
    needed = ["pyproject.toml", pyproject("readme"), "sftrl", "envs", "envs/sftrl_envs", "configs"]
    for path in needed:
        assert (REPO / path).exists(), path
        assert not any(fnmatch.fnmatch(path, p) for p in patterns), f"{path} is left out of the image"
    assert {".git", "runs", "data"} <= set(patterns)


def test_ray_cluster_nodes_install_sftrl_from_a_mounted_checkout():
    spec = read_yaml(RAY_CLUSTER)
    mounts = spec["file_mounts"]
    for target, source in mounts.items():
        assert (REPO / source).resolve() == REPO, f"file_mounts {target}: {source} is not the checkout"
    installs = [shlex.split(c) for c in spec["setup_commands"] if " pip install " in f" {c} "]
    assert installs, "no pip install in setup_commands"
    editable = []
    for words in installs:
        rest = words[words.index("install") + 1:]
        while rest:
            word, *rest = rest
            if word == "-e":
                (path, *rest) = rest
                editable.append(path)
            elif not word.startswith("-"):
                assert re.match(r"^[A-Za-z][\w.-]*(\[[\w,]+\])?(==|>=)[\d.]+$", word), (
                    f"setup_commands installs {word!r}: a pinned PyPI requirement or -e of a mounted path")
    assert editable and set(editable) <= set(mounts), (editable, list(mounts))
    setup = " ".join(spec["setup_commands"])
    assert f'"torch=={readme_torch_pin()}"' in setup
    for name, node_type in spec["available_node_types"].items():
        stated = {r: float(node_type["resources"].get(r, 0)) for r in ("CPU", "GPU")}
        assert stated == INSTANCE_TYPES[node_type["node_config"]["InstanceType"]], name


def test_every_repository_path_the_cluster_files_name_exists():
    texts = {p.name: p.read_text() for p in CLUSTER_DIR.iterdir() if p.is_file()}
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster"):]
    texts["README.md"] = section[:section.index("\n## ", 3)]
    named = {m for text in texts.values()
             for m in re.findall(r"(?<![\w/~.])((?:cluster|configs|tests|sftrl|benchmarks)/[\w./-]*\w)", text)}
    assert {"cluster/Dockerfile", "configs/celeba.yaml", "tests/test_cluster_examples.py"} <= named
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert not missing, missing

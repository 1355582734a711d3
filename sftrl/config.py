"""The experiment config: one frozen dataclass tree, loaded from YAML with dotted overrides.

Every field documents itself (the README's config reference is generated from these docs).
``load(path, overrides)`` builds and validates the tree; every user mistake is a one-line
``ConfigError`` naming the dotted key, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from sftrl.configtools import ConfigError, doc_field, load_config, to_dict

TOY_DATASETS = ("swissroll", "moons", "gaussian")
IMAGE_DATASETS = ("digits", "mnist", "cifar10", "celeba", "folder")

# Seeds feed torch, numpy and scikit-learn; the evaluation adds offsets of up to about 1.2e5,
# and scikit-learn takes seeds below 2**32.
SEED_MAX = 2**31 - 1
# Upper bounds of sizes that allocate memory or time in proportion: far above any experiment,
# they turn a typo (an extra zero or three) into a one-line error instead of a crash minutes in.
MAX_WIDTH = 16_384  # an MLP width or a conv's channels
MAX_SAMPLES = 10_000_000  # points, samples or chains in one array
# The run directory is <name>-<timestamp> (16 characters); file systems take 255 bytes a name.
MAX_NAME = 200


def float_leaves(node, prefix: str = ""):
    """``(dotted key, value)`` of every float setting of a config tree (None ones left out)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from float_leaves(value, key + ".")
        elif isinstance(value, float):
            yield key, value


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: Literal["swissroll", "moons", "gaussian", "digits", "mnist", "cifar10", "celeba", "folder"] = doc_field(
        "swissroll", "Dataset: a 2-D toy set (swissroll, moons, gaussian) or an image set."
    )
    num_train: int = doc_field(10_000, "Toy sets: points in the training set (the paper uses 10K).")
    path: str | None = doc_field(None, "Image sets: where the files are (digits ships with scikit-learn).")
    image_size: int | None = doc_field(None, "Image sets: side length after cropping/resizing (null: the set's own).")
    seed: int = doc_field(0, "Seed of the training-set draw (toy sets).")
    limit: int | None = doc_field(None, "Image sets: use only the first N images (quick runs and tests).")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    num_train_steps: int = doc_field(10, "T, the number of steps the base DDPM was trained with.")
    beta_schedule: Literal["linear", "sigmoid"] = doc_field(
        "sigmoid", "Base betas: linear 1e-4..0.02 (Ho et al.) or the toy sigmoid 1e-5..1e-2."
    )
    schedule: Literal["ddpm", "strided", "fastdpm-var-linear", "fastdpm-var-quadratic", "ddim"] = doc_field(
        "ddpm", "Sampling schedule (see `sftrl schedule --help`)."
    )
    steps: int = doc_field(10, "S, the number of sampling steps (T' in the paper).")
    kappa: float = doc_field(1.0, "FastDPM's eta, in [0, 1]: noise scale of the FastDPM schedules (1: DDPM-like).")
    variance: Literal["beta", "posterior"] = doc_field(
        "beta", "ddpm/strided step variance: beta_t or the posterior beta~_t (paper Eq. 2)."
    )
    final_step_std: float = doc_field(
        0.0, "Std used during training rollouts where a step has sigma = 0 (the paper's image code: 0.001)."
    )
    log_prob_reduction: Literal["sum", "mean"] = doc_field(
        "sum", "How log pi is reduced over data dims: sum (toy) or mean (the paper's images); sets the PG scale."
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    sampler: Literal["toy-mlp", "unet"] = doc_field("toy-mlp", "The eps-prediction network.")
    hidden: int = doc_field(128, "Toy sampler: hidden width of the 4-layer MLP.")
    critic_hidden: tuple[int, ...] = doc_field((128, 128), "Toy critic: hidden widths (paper F.1: 128; the authors' code: 256).")
    baseline_hidden: tuple[int, ...] = doc_field(
        (128, 128), "Baseline hidden widths (toy, the paper: (128, 128); images, the paper: (1024, 1024, 256))."
    )
    critic_channels: tuple[int, ...] = doc_field(
        (256, 512, 1024), "Image critic: channels of its three stride-2 convs (paper 256-512-1024; code 128-256-512)."
    )
    unet_ch: int = doc_field(128, "U-Net base channels (the DDPM CIFAR-10/CelebA models: 128).")
    unet_ch_mult: tuple[int, ...] = doc_field((1, 2, 2, 2), "U-Net channel multipliers per resolution (CelebA: 1,2,2,2,4).")
    unet_num_res_blocks: int = doc_field(2, "U-Net residual blocks per resolution.")
    unet_attn_resolutions: tuple[int, ...] = doc_field((16,), "U-Net resolutions with self-attention.")
    unet_dropout: float = doc_field(0.1, "U-Net dropout (pretraining only; fine-tuning runs the network in eval mode).")
    checkpoint: str | None = doc_field(
        None, "Pretrained sampler checkpoint; null: pretrain one and cache it (keyed by the pretraining config)."
    )


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    epochs: int = doc_field(2000, "DDPM pretraining epochs (passes over the training set; paper: 2000).")
    batch_size: int = doc_field(128, "Pretraining batch size (paper: 128).")
    lr: float = doc_field(1e-3, "RMSprop learning rate (paper: 1e-3).")
    max_grad_norm: float = doc_field(1.0, "Gradient-norm clip during pretraining (paper: 1.0).")
    seed: int = doc_field(0, "Pretraining seed.")
    cache_dir: str = doc_field("~/.cache/sftrl/pretrained", "Where pretrained samplers are cached.")
    ema_decay: float | None = doc_field(
        None,
        "Keep the moving average of the pretraining weights with this decay (null: the model's recipe, "
        "0.999 for the U-Net, none for the toy MLP as in the paper; 0: none).",
    )


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    name: str = doc_field("sft-pg", "Policy-gradient algorithm: sft-pg (the paper), ppo, sft (pathwise).")
    critic_regulariser: Literal["B", "GP"] = doc_field(
        "B", "Critic regulariser: B, baseline regularisation (Eq. 23), or GP, gradient penalty (Eq. 22)."
    )
    lam: float = doc_field(0.1, "lambda, weight of R_B in Eq. 23 (toy 0.1, images 1.0).")
    gp_eta: float = doc_field(0.001, "eta, weight of the gradient penalty (Eq. 22; the paper's best 0.001).")
    n_critic: int = doc_field(5, "Critic updates per iteration, each on a fresh rollout block (Algorithm 1).")
    n_generator: int = doc_field(1, "Policy steps per iteration (Algorithm 1; toy 1, images 10).")
    batch_size: int = doc_field(128, "m: chains per rollout block and transitions per policy step.")
    max_grad_norm: float | None = doc_field(None, "gamma, the policy gradient-norm clip (null: none; images 0.1).")
    policy_lr: float = doc_field(5e-5, "Adam learning rate of the sampler (toy 5e-5, images 1e-6).")
    critic_lr: float = doc_field(1e-3, "Adam learning rate of the critic (toy 1e-3, images 1e-4).")
    baseline_lr: float = doc_field(1e-3, "Adam learning rate of the baseline (toy 1e-3, images 1e-4).")
    policy_lr_decay: Literal["constant", "linear"] = doc_field(
        "constant", "Sampler learning rate over the run: constant (the paper) or linear decay to 0 at the last iteration."
    )
    ema_decay: float = doc_field(
        0.0, "Decay of the moving average of the sampler weights that evaluation and `sftrl sample` use (0: none, use the last weights)."
    )
    ppo_clip: float = doc_field(0.2, "ppo: clip range of the importance (density) ratio pi / pi_behaviour.")
    ppo_epochs: int = doc_field(2, "ppo: passes over the buffer per iteration.")
    max_importance_weight: float = doc_field(
        1.0,
        "sft-pg with rollout.max_lag >= 1: truncation of the importance weight pi_theta / pi_behaviour "
        "on transitions collected with older weights (V-trace's rho-bar).",
    )


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    iterations: int = doc_field(4000, "Iterations of Algorithm 1 (critic phase + generator phase).")
    eval_every: int = doc_field(500, "Evaluate every this many iterations (0: only at the start and the end).")
    eval_samples: int = doc_field(10_000, "Samples per evaluation draw (Table 1: 10K).")
    eval_draws: int = doc_field(5, "Independent draws per evaluation; SW2 is reported as mean and spread.")
    exact_w2_points: int = doc_field(2000, "Points per side for exact W2 (ot.emd2); 0 disables it.")
    log_every: int = doc_field(50, "Write a metrics line every this many iterations.")
    checkpoint_every: int = doc_field(1000, "Checkpoint every this many iterations (0: only at the end).")
    keep_checkpoints: int = doc_field(3, "How many checkpoints to keep (older ones are deleted).")
    max_nonfinite_updates: int = doc_field(10, "Stop after this many non-finite updates in a row.")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = doc_field(1, "Rollout workers (Ray actors), spread across nodes.")
    num_gpus_per_worker: float = doc_field(0.0, "GPUs per rollout worker; fractions share a GPU.")
    num_cpus_per_worker: float = doc_field(0.5, "CPUs Ray reserves per rollout worker.")
    max_restarts: int = doc_field(3, "Times Ray restarts a failed rollout worker.")
    max_lag: int = doc_field(
        0,
        "Weights versions the rollouts may run behind the learner: 0 is sync mode (Algorithm 1 exactly); "
        "k >= 1 is async mode, the workers collect up to k iterations ahead with older weights.",
    )
    call_timeout_multiple: float = doc_field(
        10.0,
        "A rollout call not back after this many times the median of the last 20 calls (and at least "
        "call_timeout_floor_s) is a hung worker: it is restarted and its blocks collected elsewhere (0: never).",
    )
    call_timeout_floor_s: float = doc_field(
        60.0,
        "The shortest wait before a rollout call counts as hung; before any call has been timed, the wait is "
        "call_timeout_multiple times this (a first call compiles and warms up).",
    )


@dataclasses.dataclass(frozen=True)
class RayConfig:
    backend: Literal["ray", "local"] = doc_field(
        "ray", "ray: actors; local: the same components in one process (debugging, overhead baselines)."
    )
    address: str | None = doc_field(
        None, "Ray cluster address; null: join the cluster this job runs on, else start Ray in-process."
    )
    num_cpus: int | None = doc_field(None, "CPUs for an in-process Ray (null: all).")
    learner_num_gpus: float = doc_field(0.0, "GPUs reserved by the learner actor.")
    critic_num_gpus: float = doc_field(0.0, "GPUs reserved by the critic actor.")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = doc_field("swissroll", "Experiment name (names the run directory).")
    seed: int = doc_field(0, "Master seed of rollouts, learners and evaluation.")
    device: Literal["auto", "cpu", "cuda"] = doc_field(
        "auto", "Torch device of every component (auto: cuda if present; in a Ray actor: cuda when it reserves a GPU share)."
    )
    torch_threads: int = doc_field(1, "Torch CPU threads per process (1 is fastest for the toy MLPs).")
    data: DataConfig = doc_field(doc="The real data q_0.", default_factory=DataConfig)
    diffusion: DiffusionConfig = doc_field(doc="Base DDPM and sampling schedule.", default_factory=DiffusionConfig)
    model: ModelConfig = doc_field(doc="Sampler, critic and baseline networks.", default_factory=ModelConfig)
    pretrain: PretrainConfig = doc_field(doc="DDPM pretraining of the initial sampler.", default_factory=PretrainConfig)
    algo: AlgoConfig = doc_field(doc="Fine-tuning algorithm (Algorithm 1).", default_factory=AlgoConfig)
    trainer: TrainerConfig = doc_field(doc="The training loop.", default_factory=TrainerConfig)
    rollout: RolloutConfig = doc_field(doc="Rollout workers.", default_factory=RolloutConfig)
    ray: RayConfig = doc_field(doc="Ray.", default_factory=RayConfig)

    @property
    def is_toy(self) -> bool:
        return self.data.name in TOY_DATASETS

    def validate(self) -> Config:
        """The fields' own rules and the rules between them; raises ConfigError naming the key.
        Returns self for chaining. (What needs the schedule or the algorithm registry is checked
        where they are derived: ``RunPlan.of``.)"""

        def need(ok: bool, key: str, value, valid: str) -> None:
            if not ok:
                raise ConfigError(f"'{key}' = {value!r} is invalid: {valid}", key=key)

        def within(key: str, value, low: int, high: int) -> None:
            need(value is None or low <= value <= high, key, value, f"must be between {low} and {high}")

        def widths(key: str, values: tuple[int, ...], count: int | None = None) -> None:
            need(bool(values) and (count is None or len(values) == count), key, list(values),
                 f"must be {count if count else 'one or more'} width(s)")
            for i, v in enumerate(values):
                within(f"{key}[{i}]", v, 1, MAX_WIDTH)

        d, a, t, m = self.diffusion, self.algo, self.trainer, self.model
        need(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name)), "name", self.name,
             "names the run directory runs/<name>-<timestamp>: letters, digits, '.', '_' and '-', no '/'")
        need(len(self.name) <= MAX_NAME, "name", self.name[:40] + "...",
             f"names the run directory: at most {MAX_NAME} characters (it has {len(self.name)})")
        for key, value in float_leaves(self):
            need(math.isfinite(value), key, value, "must be a finite number")
        for key, seed in (("seed", self.seed), ("data.seed", self.data.seed), ("pretrain.seed", self.pretrain.seed)):
            within(key, seed, 0, SEED_MAX)
        within("model.hidden", m.hidden, 1, MAX_WIDTH)
        widths("model.critic_hidden", m.critic_hidden)
        widths("model.baseline_hidden", m.baseline_hidden)
        widths("model.critic_channels", m.critic_channels, count=3)
        within("model.unet_ch", m.unet_ch, 1, MAX_WIDTH)
        need(bool(m.unet_ch_mult), "model.unet_ch_mult", list(m.unet_ch_mult), "must name at least one level")
        for i, mult in enumerate(m.unet_ch_mult):
            within(f"model.unet_ch_mult[{i}]", mult, 1, 64)
        within("model.unet_num_res_blocks", m.unet_num_res_blocks, 1, 16)
        for i, res in enumerate(m.unet_attn_resolutions):
            within(f"model.unet_attn_resolutions[{i}]", res, 1, 4096)
        need(0 <= m.unet_dropout < 1, "model.unet_dropout", m.unet_dropout, "must be in [0, 1)")
        within("data.num_train", self.data.num_train, 1, MAX_SAMPLES)
        within("data.image_size", self.data.image_size, 1, 4096)
        within("data.limit", self.data.limit, 1, MAX_SAMPLES)
        within("diffusion.num_train_steps", d.num_train_steps, 1, 100_000)
        within("trainer.eval_samples", t.eval_samples, 1, MAX_SAMPLES)
        within("trainer.eval_draws", t.eval_draws, 1, 1000)
        within("trainer.exact_w2_points", t.exact_w2_points, 0, 10_000)  # ot.emd2 is cubic: 10K took 25 s, 4 GiB
        within("algo.batch_size", a.batch_size, 1, MAX_SAMPLES)
        within("pretrain.batch_size", self.pretrain.batch_size, 1, MAX_SAMPLES)
        within("rollout.num_workers", self.rollout.num_workers, 1, 10_000)
        need(d.num_train_steps >= 1, "diffusion.num_train_steps", d.num_train_steps, "must be >= 1")
        need(1 <= d.steps <= d.num_train_steps, "diffusion.steps", d.steps,
             f"must be between 1 and diffusion.num_train_steps = {d.num_train_steps}")
        need(d.schedule != "ddpm" or d.steps == d.num_train_steps, "diffusion.steps", d.steps,
             f"schedule 'ddpm' runs all T = {d.num_train_steps} steps; use 'strided' or a FastDPM schedule for fewer")
        need(not d.schedule.startswith("fastdpm") or d.beta_schedule == "linear", "diffusion.beta_schedule",
             d.beta_schedule, f"schedule {d.schedule!r} needs 'linear' base betas")
        need(0 <= d.kappa <= 1, "diffusion.kappa", d.kappa,
             "must be in [0, 1] (0: DDIM's deterministic step, 1: DDPM-like; above 1 a step would add more noise "
             "than the chain holds)")
        need(d.final_step_std >= 0, "diffusion.final_step_std", d.final_step_std, "must be >= 0")
        need(a.name != "sft" or a.critic_regulariser == "GP", "algo.critic_regulariser", a.critic_regulariser,
             "algorithm 'sft' (pathwise) needs a Lipschitz critic: use 'GP'")
        for key in ("n_critic", "n_generator", "batch_size", "ppo_epochs"):
            need(getattr(a, key) >= 1, f"algo.{key}", getattr(a, key), "must be >= 1")
        for key in ("policy_lr", "critic_lr", "baseline_lr", "ppo_clip", "max_importance_weight"):
            need(getattr(a, key) > 0, f"algo.{key}", getattr(a, key), "must be > 0")
        for key in ("lam", "gp_eta"):
            need(getattr(a, key) >= 0, f"algo.{key}", getattr(a, key), "must be >= 0")
        need(a.critic_regulariser != "B" or a.lam > 0, "algo.lam", a.lam,
             "critic_regulariser 'B' trains the baseline through R_B alone (Eq. 23): lam must be > 0")
        need(0 <= a.ema_decay < 1, "algo.ema_decay", a.ema_decay, "must be in [0, 1) (0: no average)")
        need(a.max_grad_norm is None or a.max_grad_norm > 0, "algo.max_grad_norm", a.max_grad_norm, "must be > 0 or null")
        need(t.iterations >= 1, "trainer.iterations", t.iterations, "must be >= 1")
        for key in ("eval_every", "checkpoint_every", "exact_w2_points"):
            need(getattr(t, key) >= 0, f"trainer.{key}", getattr(t, key), "must be >= 0")
        for key in ("eval_samples", "eval_draws", "log_every", "keep_checkpoints", "max_nonfinite_updates"):
            need(getattr(t, key) >= 1, f"trainer.{key}", getattr(t, key), "must be >= 1")
        p = self.pretrain
        for key in ("epochs", "batch_size"):
            need(getattr(p, key) >= 1, f"pretrain.{key}", getattr(p, key), "must be >= 1")
        need(p.lr > 0, "pretrain.lr", p.lr, "must be > 0")
        need(p.max_grad_norm > 0, "pretrain.max_grad_norm", p.max_grad_norm, "must be > 0")
        need(p.ema_decay is None or 0 <= p.ema_decay < 1, "pretrain.ema_decay", p.ema_decay,
             "must be null (the model's recipe) or in [0, 1) (0: no average)")
        r = self.rollout
        need(r.num_workers >= 1, "rollout.num_workers", r.num_workers, "must be >= 1")
        need(r.num_gpus_per_worker >= 0, "rollout.num_gpus_per_worker", r.num_gpus_per_worker, "must be >= 0")
        need(r.num_cpus_per_worker >= 0, "rollout.num_cpus_per_worker", r.num_cpus_per_worker, "must be >= 0")
        need(r.max_restarts >= 0, "rollout.max_restarts", r.max_restarts, "must be >= 0")
        need(r.max_lag >= 0, "rollout.max_lag", r.max_lag, "must be >= 0 (0: sync mode)")
        need(r.call_timeout_multiple == 0 or r.call_timeout_multiple >= 1, "rollout.call_timeout_multiple",
             r.call_timeout_multiple, "must be >= 1 (or 0: no watch on hung workers)")
        need(r.call_timeout_floor_s > 0, "rollout.call_timeout_floor_s", r.call_timeout_floor_s, "must be > 0")
        need(not (r.max_lag and 0 < t.checkpoint_every <= r.max_lag), "rollout.max_lag", r.max_lag,
             f"async mode's pipeline restarts at every checkpoint, so with trainer.checkpoint_every = "
             f"{t.checkpoint_every} the lag never reaches it: raise trainer.checkpoint_every above it "
             "(or set it to 0: a checkpoint only at the end)")
        for key in ("learner_num_gpus", "critic_num_gpus"):
            need(getattr(self.ray, key) >= 0, f"ray.{key}", getattr(self.ray, key), "must be >= 0")
        need(self.ray.num_cpus is None or self.ray.num_cpus >= 1, "ray.num_cpus", self.ray.num_cpus,
             "must be >= 1, or null (all of this machine's)")
        need(self.torch_threads >= 1, "torch_threads", self.torch_threads, "must be >= 1")
        if self.device == "cuda" and self.ray.backend == "ray":
            shares = {"rollout.num_gpus_per_worker": r.num_gpus_per_worker,
                      "ray.learner_num_gpus": self.ray.learner_num_gpus, "ray.critic_num_gpus": self.ray.critic_num_gpus}
            without = [f"{k}={v:g}" for k, v in shares.items() if v == 0]
            need(not without, "device", self.device,
                 f"Ray gives a GPU only to actors that reserve a share, and {', '.join(without)}: "
                 "give each a share (fractions are fine), or use device=auto (an actor computes on the GPU "
                 "exactly when it reserves one)")
        need(self.data.num_train >= 1, "data.num_train", self.data.num_train, "must be >= 1")
        if self.is_toy:
            need(self.model.sampler == "toy-mlp", "model.sampler", self.model.sampler,
                 f"the 2-D toy set {self.data.name!r} uses 'toy-mlp'")
        else:
            need(self.model.sampler == "unet", "model.sampler", self.model.sampler,
                 f"the image set {self.data.name!r} uses 'unet'")
        return self


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML; None: defaults), apply ``key.sub=value`` overrides, check: the
    fields (``Config.validate``) and what the run derives from them (``RunPlan.of``)."""
    from sftrl.plan import RunPlan

    def check(cfg: Config) -> None:
        RunPlan.of(cfg.validate())

    return load_config(Config, path, overrides, check=check)


def pretrain_key(cfg: Config) -> str:
    """A short hash of everything that determines the pretrained sampler (its cache key)."""
    relevant = {
        "data": to_dict(cfg.data),
        "num_train_steps": cfg.diffusion.num_train_steps,
        "beta_schedule": cfg.diffusion.beta_schedule,
        "sampler": cfg.model.sampler,
        "hidden": cfg.model.hidden,
        # Unset (null) options stay out of the key: samplers cached before an option existed keep theirs.
        "pretrain": {k: v for k, v in to_dict(cfg.pretrain).items() if k != "cache_dir" and v is not None},
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

"""The experiment config: one frozen dataclass tree, loaded from YAML with dotted overrides.

Every field documents itself (the README's config reference is generated from these docs).
``load(path, overrides)`` builds and validates the tree; every user mistake is a one-line
``ConfigError`` naming the dotted key, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from sftrl.configtools import (
    ConfigError,
    NamedSections,
    Range,
    Sections,
    check_ranges,
    doc_field,
    load_config,
    to_dict,
)

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
POSITIVE = Range(0.0, low_open=True)  # > 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: Literal["swissroll", "moons", "gaussian", "digits", "mnist", "cifar10", "celeba", "folder"] = doc_field(
        "swissroll", "Dataset: a 2-D toy set (swissroll, moons, gaussian) or an image set."
    )
    num_train: int = doc_field(10_000, "Toy sets: points in the training set (the paper uses 10K).", valid=Range(1, MAX_SAMPLES))
    path: str | None = doc_field(None, "Image sets: where the files are (digits ships with scikit-learn).")
    image_size: int | None = doc_field(None, "Image sets: side length after cropping/resizing (null: the set's own).", valid=Range(1, 4096))
    seed: int = doc_field(0, "Seed of the training-set draw (toy sets).", valid=Range(0, SEED_MAX))
    limit: int | None = doc_field(None, "Image sets: use only the first N images (quick runs and tests).", valid=Range(1, MAX_SAMPLES))
    flip: bool | None = doc_field(
        None, "Image sets: flip real images left-right at random, in critic and pretraining batches (null: as the "
        "authors' code, on for cifar10 and celeba).",
    )
    split: Literal["train", "all"] = doc_field(
        "train", "celeba: the official 162,770-image train split (list_eval_partition.txt where present, else "
        "the first 162,770 files by name), or all 202,599.",
    )


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    num_train_steps: int = doc_field(10, "T, the number of steps the base DDPM was trained with.", valid=Range(1, 100_000))
    beta_schedule: Literal["linear", "sigmoid"] = doc_field(
        "sigmoid", "Base betas: linear 1e-4..0.02 (Ho et al.) or the toy sigmoid 1e-5..1e-2."
    )
    schedule: Literal["ddpm", "strided", "fastdpm-var-linear", "fastdpm-var-quadratic", "ddim"] = doc_field(
        "ddpm", "Sampling schedule (see `sftrl schedule --help`)."
    )
    steps: int = doc_field(10, "S, the number of sampling steps (T' in the paper).")
    kappa: float = doc_field(
        1.0, "FastDPM's eta: noise scale of the FastDPM schedules (1: DDPM-like).",
        valid=Range(0.0, 1.0, note="(0: DDIM's deterministic step, 1: DDPM-like; above 1 a step would add more "
                                   "noise than the chain holds)"),
    )
    variance: Literal["beta", "posterior"] = doc_field(
        "beta", "ddpm/strided step variance: beta_t or the posterior beta~_t (paper Eq. 2)."
    )
    final_step_std: float = doc_field(
        0.0, "Std used during training rollouts where a step has sigma = 0 (the paper's image code: 0.001).",
        valid=Range(0.0),
    )
    log_prob_reduction: Literal["sum", "mean"] = doc_field(
        "sum", "How log pi is reduced over data dims: sum (toy) or mean (the paper's images); sets the PG scale."
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    sampler: Literal["toy-mlp", "unet"] = doc_field("toy-mlp", "The eps-prediction network.")
    hidden: int = doc_field(128, "Toy sampler: hidden width of the 4-layer MLP.", valid=Range(1, MAX_WIDTH))
    critic_hidden: tuple[int, ...] = doc_field(
        (128, 128), "Toy critic: hidden widths (paper F.1: 128; the authors' code: 256).",
        valid=Range(1, MAX_WIDTH, items="1+"),
    )
    critic_input: Literal["raw", "standardised"] = doc_field(
        "raw", "Toy critic input: raw, or standardised by the training data's per-dimension mean and std "
        "(measured once from the real data, kept in the critic's state). Standardised, the critic's first layer sees a "
        "tight cluster (Appendix A's Gaussian, std 0.01) at unit scale instead of at 0.01."
    )
    baseline_hidden: tuple[int, ...] = doc_field(
        (128, 128), "Baseline hidden widths (toy, the paper: (128, 128); images, the paper: (1024, 1024, 256)).",
        valid=Range(1, MAX_WIDTH, items="1+"),
    )
    critic_channels: tuple[int, ...] = doc_field(
        (256, 512, 1024), "Image critic: channels of its three stride-2 convs (paper 256-512-1024; code 128-256-512).",
        valid=Range(1, MAX_WIDTH, items=3),
    )
    image_init: Literal["authors", "torch"] = doc_field(
        "authors", "Image critic and baseline init: authors (their code: Kaiming-normal conv weights, "
        "Xavier-normal linear weights, biases as PyTorch's) or torch (PyTorch's defaults: a critic "
        "about 30x smaller at the start, which shifts the early balance of the IPM gap and lambda R_B)."
    )
    learn_variance: bool = doc_field(
        False, "Learn each step's std with eps_theta (the paper fixes it): a parameter per step, started at the "
        "schedule's std (sigma, or diffusion.final_step_std where sigma is 0), trained by the policy gradient, "
        "used by rollouts, evaluation and `sftrl sample`."
    )
    learn_variance_per_channel: bool = doc_field(
        False, "Images with model.learn_variance: one std per step and channel instead of one per step."
    )
    variance_floor: float = doc_field(
        1e-4, "model.learn_variance: every learned std stays above this (std = sqrt(floor^2 + exp(2 s))); each "
        "step's starting std must be above it.", valid=Range(0.0, 1.0, low_open=True),
    )
    variance_lr: float | None = doc_field(
        None, "model.learn_variance: Adam learning rate of the learned log-stds (null: algo.policy_lr). Adam moves "
        "each log-std by about its lr per step, so the image configs' policy lr (1e-5 or less) barely moves a std "
        "in a short run.", valid=POSITIVE,
    )
    unet_ch: int = doc_field(128, "U-Net base channels (the DDPM CIFAR-10/CelebA models: 128).", valid=Range(1, MAX_WIDTH))
    unet_ch_mult: tuple[int, ...] = doc_field((1, 2, 2, 2), "U-Net channel multipliers per resolution (CelebA: 1,2,2,2,4).", valid=Range(1, 64, items="1+"))
    unet_num_res_blocks: int = doc_field(2, "U-Net residual blocks per resolution.", valid=Range(1, 16))
    unet_attn_resolutions: tuple[int, ...] = doc_field((16,), "U-Net resolutions with self-attention.", valid=Range(1, 4096))
    unet_dropout: float = doc_field(0.1, "U-Net dropout (pretraining only; fine-tuning runs the network in eval mode).", valid=Range(0.0, 1.0, high_open=True))
    checkpoint: str | None = doc_field(
        None, "Pretrained sampler checkpoint; null: pretrain one and cache it (keyed by the pretraining config)."
    )
    lora_rank: int = doc_field(
        0, "Fine-tune low-rank adapters (LoRA, via peft: pip install 'sftrl[lora]') of this rank instead of the "
        "whole sampler: the U-Net's convolutions (attention q, k, v, proj_out included), the toy MLP's linear "
        "layers; the pretrained weights stay frozen, and only the trainable tensors are published and optimised.",
        valid=Range(0, 1024, note="(0: no LoRA, the whole network is fine-tuned)"),
    )
    lora_alpha: float | None = doc_field(
        None, "LoRA's alpha: the adapters' update is scaled by lora_alpha / lora_rank (null: lora_rank, a scale of 1).",
        valid=Range(0.0, 1e6, low_open=True),
    )


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    epochs: int = doc_field(2000, "DDPM pretraining epochs (passes over the training set; paper: 2000).", valid=Range(1))
    batch_size: int = doc_field(128, "Pretraining batch size (paper: 128).", valid=Range(1, MAX_SAMPLES))
    lr: float = doc_field(1e-3, "RMSprop learning rate (paper: 1e-3).", valid=POSITIVE)
    max_grad_norm: float = doc_field(1.0, "Gradient-norm clip during pretraining (paper: 1.0).", valid=POSITIVE)
    seed: int = doc_field(0, "Pretraining seed.", valid=Range(0, SEED_MAX))
    cache_dir: str = doc_field("~/.cache/sftrl/pretrained", "Where pretrained samplers are cached.")
    ema_decay: float | None = doc_field(
        None,
        "Keep the moving average of the pretraining weights with this decay (null: the model's recipe, "
        "0.999 for the U-Net, none for the toy MLP as in the paper; 0: none).", valid=Range(0.0, 1.0, high_open=True, note="(0: no average; null: the model's recipe)"),
    )


def _algorithm_names() -> list[str]:
    from sftrl.algos import algorithm_names

    return algorithm_names()


def _algorithm_settings(name: str) -> type | None:
    """The settings class of algorithm ``name``; loads a plug-in, raises ``PluginError`` (a ConfigError)."""
    from sftrl.algos import algorithm_class

    return algorithm_class(name).settings_class


# ``algo.<name>``: an algorithm's own settings (sftrl.algos.base says how a plug-in declares them).
ALGORITHM_SETTINGS = NamedSections("algorithm", _algorithm_names, _algorithm_settings, selected_by="name")


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    name: str = doc_field(
        "sft-pg", "Policy-gradient algorithm: sft-pg (the paper), sft-pg-kl (sft-pg plus beta x the KL to the pretrained "
        "sampler or the run's best, algo.sft-pg-kl.beta and .reference), ppo, sft (pathwise), or the name of an installed "
        "plug-in (entry-point group sftrl.algorithms), whose own settings are read from algo.<name>.",
    )
    critic_regulariser: Literal["B", "GP"] = doc_field(
        "B", "Critic regulariser: B, baseline regularisation (Eq. 23), or GP, gradient penalty (Eq. 22)."
    )
    lam: float = doc_field(0.1, "lambda, weight of R_B in Eq. 23 (toy 0.1, images 1.0).", valid=Range(0.0))
    gp_eta: float = doc_field(0.001, "eta, weight of the gradient penalty (Eq. 22; the paper's best 0.001).", valid=Range(0.0))
    n_critic: int = doc_field(5, "Critic updates per iteration, each on a fresh rollout block (Algorithm 1).", valid=Range(1))
    n_generator: int = doc_field(1, "Policy steps per iteration (Algorithm 1; toy 1, images 10).", valid=Range(1))
    batch_size: int = doc_field(128, "m: chains per rollout block and transitions per policy step.", valid=Range(1, MAX_SAMPLES))
    max_grad_norm: float | None = doc_field(None, "gamma, the policy gradient-norm clip (null: none; images 0.1).", valid=POSITIVE)
    policy_lr: float = doc_field(5e-5, "Adam learning rate of the sampler (toy 5e-5, images 1e-6).", valid=POSITIVE)
    critic_lr: float = doc_field(1e-3, "Adam learning rate of the critic (toy 1e-3, images 1e-4).", valid=POSITIVE)
    baseline_lr: float = doc_field(1e-3, "Adam learning rate of the baseline (toy 1e-3, images 1e-4).", valid=POSITIVE)
    policy_lr_decay: Literal["constant", "linear"] = doc_field(
        "constant", "Sampler learning rate over the run: constant (the paper) or linear decay to 0 at the last iteration."
    )
    ema_decay: float = doc_field(
        0.0, "Decay of the moving average of the sampler weights that evaluation and `sftrl sample` use (0: none, use the last "
        "weights). Updated once per iteration (after its generator phase), so it spans about the last 1 / (1 - decay) "
        "iterations: 200 at 0.995 (the toy configs, thousands of iterations), 20 at 0.95.",
        valid=Range(0.0, 1.0, high_open=True, note="(0: no average)"),
    )
    entropy_coef: float = doc_field(
        0.0, "sft-pg, sft-pg-kl, ppo: weight of an entropy bonus on the learned step stds (the policy loss minus "
        "this x the mean entropy of the minibatch's step Gaussians, reduced like the log-prob); it pushes back "
        "against a policy gradient that shrinks the stds (0: none). Needs model.learn_variance.", valid=Range(0.0),
    )
    ppo_clip: float = doc_field(0.2, "ppo: clip range of the importance (density) ratio pi / pi_behaviour.", valid=POSITIVE)
    ppo_epochs: int = doc_field(2, "ppo: passes over the buffer per iteration.", valid=Range(1))
    max_importance_weight: float = doc_field(
        1.0,
        "sft-pg with rollout.max_lag >= 1: truncation of the importance weight pi_theta / pi_behaviour "
        "on transitions collected with older weights (V-trace's rho-bar).",
        valid=POSITIVE,
    )
    sections: Sections = doc_field(
        doc="Algorithms' own settings, keyed by algorithm name: algo.<name>.<key> (plug-ins' settings_class).",
        default_factory=Sections, sections=ALGORITHM_SETTINGS,
    )


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    iterations: int = doc_field(4000, "Iterations of Algorithm 1 (critic phase + generator phase).", valid=Range(1))
    eval_every: int = doc_field(500, "Evaluate every this many iterations (0: only at the start and the end).", valid=Range(0))
    eval_samples: int = doc_field(10_000, "Samples per evaluation draw (Table 1: 10K).", valid=Range(1, MAX_SAMPLES))
    fid_weights: str | None = doc_field(
        None, "Image sets: the FID Inception's weights file (weights-inception-2015-12-05-6726825d.pth). "
        "null: the one `sftrl weights inception` fetched, or torch-fidelity's copy; none found: FID/KID "
        "are skipped with a note and sample grids are still drawn. Never downloaded by a run."
    )
    eval_draws: int = doc_field(5, "Independent draws per evaluation; SW2 is reported as mean and spread.", valid=Range(1, 1000))
    exact_w2_points: int = doc_field(2000, "Points per side for exact W2 (ot.emd2); 0 disables it.", valid=Range(0, 10_000))
    log_every: int = doc_field(50, "Write a metrics line every this many iterations.", valid=Range(1))
    checkpoint_every: int = doc_field(1000, "Checkpoint every this many iterations (0: only at the end).", valid=Range(0))
    keep_checkpoints: int = doc_field(3, "How many checkpoints to keep (older ones are deleted).", valid=Range(1))
    max_nonfinite_updates: int = doc_field(10, "Stop after this many non-finite updates in a row.", valid=Range(1))
    keep_best: bool = doc_field(
        True, "Keep the evaluated sampler with the lowest score so far (FID, else mean SW2) as RUN/best-sampler.pt "
        "(sftrl sample/export/eval --best read it; model.checkpoint can start a run from it).",
    )
    stop_above_best: float = doc_field(
        0.0, "Stop the run when an evaluation scores above this multiple of the run's best score (FID, else mean "
        "SW2): a run that has diverged, with finite gradients, spends no more compute (0: never).",
        valid=Range(0.0, note="(0: never; else above 1, e.g. 100)"),
    )


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = doc_field(1, "Rollout workers (Ray actors), spread across nodes.", valid=Range(1, 10_000))
    num_gpus_per_worker: float = doc_field(0.0, "GPUs per rollout worker; fractions share a GPU.", valid=Range(0.0))
    num_cpus_per_worker: float = doc_field(0.5, "CPUs Ray reserves per rollout worker.", valid=Range(0.0))
    max_restarts: int = doc_field(3, "Times Ray restarts a failed rollout worker.", valid=Range(0))
    max_lag: int = doc_field(
        0,
        "Weights versions the rollouts may run behind the learner: 0 is sync mode (Algorithm 1 exactly); "
        "k >= 1 is async mode, the workers collect up to k iterations ahead with older weights.", valid=Range(0, note="(0: sync mode)"),
    )
    call_timeout_multiple: float = doc_field(
        10.0,
        "A rollout call not back after this many times the median of the last 20 calls (and at least "
        "call_timeout_floor_s) is a hung worker: it is restarted and its blocks collected elsewhere (0: never).",
    )
    call_timeout_floor_s: float = doc_field(
        60.0,
        "The shortest wait (seconds) before a rollout call counts as hung; before any call has been timed, the "
        "wait is call_timeout_multiple times this (a first call compiles and warms up).",
        valid=Range(1.0, note="(a shorter wait restarts workers that are only slow)"),
    )


@dataclasses.dataclass(frozen=True)
class PerfConfig:
    precision: Literal["fp32", "bf16"] = doc_field(
        "fp32", "The sampler's forward in rollouts and policy steps: fp32, or bf16 autocast (its mean, log-prob "
        "and optimiser stay fp32; evaluation always samples in fp32).",
    )
    compile: bool = doc_field(
        False, "torch.compile the sampler's forward (compiled at a warm-up call, not timed as training; where it "
        "fails: a warning, then eager).",
    )
    channels_last: bool = doc_field(False, "Keep the U-Net's weights in channels_last memory format (GPU convolutions).")
    tf32: bool = doc_field(
        False, "Allow TF32 matmuls and convolutions on GPUs (faster, 10-bit mantissas; off: the worker's and the "
        "learner's kernels round alike).",
    )


@dataclasses.dataclass(frozen=True)
class RayConfig:
    backend: Literal["ray", "local"] = doc_field(
        "ray", "ray: actors; local: the same components in one process (debugging, overhead baselines)."
    )
    address: str | None = doc_field(
        None, "Ray cluster address; null: join the cluster this job runs on, else start Ray in-process."
    )
    placement_timeout_s: float = doc_field(
        600.0, "How long a joined cluster may take to place the run's actors (an autoscaler adding nodes) before the "
        "run stops naming what is missing.", valid=Range(1.0),
    )
    num_cpus: int | None = doc_field(None, "CPUs for an in-process Ray (null: all).", valid=Range(1, note="(null: all of this machine's)"))
    num_learners: int = doc_field(
        1, "Learner actors sharing each policy batch (gradients summed across them with torch.distributed: "
        "gloo on CPUs, NCCL on GPUs); each reserves ray.learner_num_gpus.", valid=Range(1, 64),
    )
    learner_num_gpus: float = doc_field(0.0, "GPUs reserved by each learner actor.", valid=Range(0.0))
    critic_num_gpus: float = doc_field(0.0, "GPUs reserved by the critic actor.", valid=Range(0.0))


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = doc_field("swissroll", "Experiment name (names the run directory).")
    seed: int = doc_field(0, "Master seed of rollouts, learners and evaluation.", valid=Range(0, SEED_MAX))
    device: Literal["auto", "cpu", "cuda"] = doc_field(
        "auto", "Torch device of every component (auto: cuda if present; in a Ray actor: cuda when it reserves a GPU share)."
    )
    torch_threads: int = doc_field(1, "Torch CPU threads per process (1 is fastest for the toy MLPs).", valid=Range(1))
    data: DataConfig = doc_field(doc="The real data q_0.", default_factory=DataConfig)
    diffusion: DiffusionConfig = doc_field(doc="Base DDPM and sampling schedule.", default_factory=DiffusionConfig)
    model: ModelConfig = doc_field(doc="Sampler, critic and baseline networks.", default_factory=ModelConfig)
    pretrain: PretrainConfig = doc_field(doc="DDPM pretraining of the initial sampler.", default_factory=PretrainConfig)
    algo: AlgoConfig = doc_field(doc="Fine-tuning algorithm (Algorithm 1).", default_factory=AlgoConfig)
    trainer: TrainerConfig = doc_field(doc="The training loop.", default_factory=TrainerConfig)
    rollout: RolloutConfig = doc_field(doc="Rollout workers.", default_factory=RolloutConfig)
    perf: PerfConfig = doc_field(doc="How the sampler network runs (precision, compilation, memory format).",
                                 default_factory=PerfConfig)
    ray: RayConfig = doc_field(doc="Ray.", default_factory=RayConfig)

    @property
    def is_toy(self) -> bool:
        return self.data.name in TOY_DATASETS

    def validate(self) -> Config:
        """Check the config; raises ConfigError naming the key. Returns self for chaining.

        Each field's own range is declared beside it (``valid=Range(...)``) and checked, with
        every number's finiteness, by ``check_ranges``; here follow the rules between fields.
        (What needs the schedule or the algorithm registry is checked where they are derived:
        ``RunPlan.of``.)"""

        def need(ok: bool, key: str, value, valid: str) -> None:
            if not ok:
                raise ConfigError(f"'{key}' = {value!r} is invalid: {valid}", key=key)

        check_ranges(self)
        d, a, t, r = self.diffusion, self.algo, self.trainer, self.rollout
        need(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name)), "name", self.name,
             "names the run directory runs/<name>-<timestamp>: letters, digits, '.', '_' and '-', no '/'")
        need(len(self.name) <= MAX_NAME, "name", self.name[:40] + "...",
             f"names the run directory: at most {MAX_NAME} characters (it has {len(self.name)})")
        need(1 <= d.steps <= d.num_train_steps, "diffusion.steps", d.steps,
             f"must be between 1 and diffusion.num_train_steps = {d.num_train_steps}")
        need(d.schedule != "ddpm" or d.steps == d.num_train_steps, "diffusion.steps", d.steps,
             f"schedule 'ddpm' runs all T = {d.num_train_steps} steps; use 'strided' or a FastDPM schedule for fewer")
        need(not d.schedule.startswith("fastdpm") or d.beta_schedule == "linear", "diffusion.beta_schedule",
             d.beta_schedule, f"schedule {d.schedule!r} needs 'linear' base betas")
        need(a.name != "sft" or a.critic_regulariser == "GP", "algo.critic_regulariser", a.critic_regulariser,
             "algorithm 'sft' (pathwise) needs a Lipschitz critic: use 'GP'")
        need(a.critic_regulariser != "B" or a.lam > 0, "algo.lam", a.lam,
             "critic_regulariser 'B' trains the baseline through R_B alone (Eq. 23): lam must be > 0")
        need(r.call_timeout_multiple == 0 or r.call_timeout_multiple >= 1, "rollout.call_timeout_multiple",
             r.call_timeout_multiple, "must be >= 1 (or 0: no watch on hung workers)")
        need(t.stop_above_best == 0 or t.stop_above_best > 1, "trainer.stop_above_best", t.stop_above_best,
             "is a multiple of the run's best score: above 1 (e.g. 100), or 0 to never stop on the score")
        need(not (r.max_lag and 0 < t.checkpoint_every <= r.max_lag), "rollout.max_lag", r.max_lag,
             f"async mode's pipeline restarts at every checkpoint, so with trainer.checkpoint_every = "
             f"{t.checkpoint_every} the lag never reaches it: raise trainer.checkpoint_every above it "
             "(or set it to 0: a checkpoint only at the end)")
        if self.device == "cuda" and self.ray.backend == "ray":
            shares = {"rollout.num_gpus_per_worker": r.num_gpus_per_worker,
                      "ray.learner_num_gpus": self.ray.learner_num_gpus, "ray.critic_num_gpus": self.ray.critic_num_gpus}
            without = [f"{k}={v:g}" for k, v in shares.items() if v == 0]
            need(not without, "device", self.device,
                 f"Ray gives a GPU only to actors that reserve a share, and {', '.join(without)}: "
                 "give each a share (fractions are fine), or use device=auto (an actor computes on the GPU "
                 "exactly when it reserves one)")
        need(self.ray.num_learners == 1 or self.ray.backend == "ray", "ray.num_learners", self.ray.num_learners,
             "several learners are Ray actors: use ray.backend=ray (or 1 learner)")
        sampler = "toy-mlp" if self.is_toy else "unet"
        need(self.model.sampler == sampler, "model.sampler", self.model.sampler,
             f"the {'2-D toy' if self.is_toy else 'image'} set {self.data.name!r} uses {sampler!r}")
        m = self.model
        need(not m.learn_variance_per_channel or (m.learn_variance and not self.is_toy), "model.learn_variance_per_channel",
             m.learn_variance_per_channel, "a std per channel needs model.learn_variance: true and an image set"
             if self.is_toy or not m.learn_variance else "")
        need(a.entropy_coef == 0 or a.name != "sft", "algo.entropy_coef", a.entropy_coef,
             "is a bonus in the policy-gradient loss; algorithm 'sft' back-propagates through the chain and has "
             "none: leave it 0")
        need(a.entropy_coef == 0 or m.learn_variance, "algo.entropy_coef", a.entropy_coef,
             "is a bonus on the learned step stds: set model.learn_variance: true too (fixed stds have a "
             "constant entropy), or leave it 0")
        need(m.variance_lr is None or m.learn_variance, "model.variance_lr", m.variance_lr,
             "is the learned stds' learning rate: set model.learn_variance: true too, or leave it null")
        need(m.critic_input == "raw" or self.is_toy, "model.critic_input", m.critic_input,
             "standardises a 2-D toy set's coordinates; image data is already in [-1, 1]: use 'raw'")
        need(m.lora_alpha is None or m.lora_rank > 0, "model.lora_alpha", m.lora_alpha,
             "scales LoRA's adapters: set model.lora_rank > 0 too, or leave it null")
        if m.lora_rank > 0:
            from sftrl.lora import PEFT_INSTALL, peft_installed

            need(peft_installed(), "model.lora_rank", m.lora_rank, f"LoRA needs the peft library: {PEFT_INSTALL}")
        return self


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML; None: defaults), apply ``key.sub=value`` overrides, check: the
    fields (``Config.validate``) and what the run derives from them (``RunPlan.of``).

    A diffusers folder as ``model.checkpoint`` fills the U-Net and beta-schedule keys the config
    leaves unset and must agree with those it sets (``sftrl.checkpoint_settings``)."""
    from sftrl.checkpoint_settings import CheckpointSettings
    from sftrl.plan import RunPlan

    from_checkpoint = CheckpointSettings.of(Config, path, overrides)

    def check(cfg: Config) -> None:
        from_checkpoint.check()
        RunPlan.of(cfg.validate())

    return load_config(Config, path, [*overrides, *from_checkpoint.overrides], check=check)


def pretrain_key(cfg: Config) -> str:
    """A short hash of everything that determines the pretrained sampler (its cache key)."""
    from sftrl.data import flips

    # data.flip and data.split joined later: they key only where they change the data, so
    # samplers cached before them keep their key.
    data = {k: v for k, v in to_dict(cfg.data).items() if k not in ("flip", "split")}
    if flips(cfg):
        data["flip"] = True
    if cfg.data.name == "celeba":
        data["split"] = cfg.data.split
    relevant = {
        "data": data,
        "num_train_steps": cfg.diffusion.num_train_steps,
        "beta_schedule": cfg.diffusion.beta_schedule,
        "sampler": cfg.model.sampler,
        "hidden": cfg.model.hidden,
        # Unset (null) options stay out of the key: samplers cached before an option existed keep theirs.
        "pretrain": {k: v for k, v in to_dict(cfg.pretrain).items() if k != "cache_dir" and v is not None},
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

"""Factories of the plain components from a config: the same code builds them in-process and
inside Ray actors (``sftrl.distributed``), so both backends run identical objects."""

from __future__ import annotations

import dataclasses

import torch

from sftrl.algos import make_algorithm
from sftrl.buffer import ReplayBuffer
from sftrl.config import Config
from sftrl.critic import CriticLearner, TensorData
from sftrl.data import RealData, load_real_data
from sftrl.data.store import ImageStore
from sftrl.learner import Learner
from sftrl.models import build_networks
from sftrl.perf import set_matmul_precision, warm_up
from sftrl.plan import RunPlan, Seeds, worker_name
from sftrl.rollout import RolloutWorker
from sftrl.weights import NumpyState, load_numpy_state


@dataclasses.dataclass(frozen=True)
class InitState:
    """What every component starts from: the pretrained sampler and the data's shape.

    Rollout workers and the critic get ``sampler_state=None``: they start before pretraining
    ends, and every ``collect`` call brings the current weights (with LoRA, the adapters and,
    once per worker, the frozen base: ``RolloutPool.base``). The state is the plain network's:
    adapters are applied after it is loaded (``adapt_sampler``).
    """

    sampler_state: NumpyState | None
    data_shape: tuple[int, ...]


def resolve_device(cfg: Config) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no GPU on this machine "
                         "(torch.cuda.is_available() is False); valid here: auto or cpu")
    return cfg.device


def _networks(cfg: Config, init: InitState):
    # Critic and baseline start from the same seeded init in every process.
    torch.manual_seed(Seeds(cfg.seed).networks)
    sampler, critic, baseline = build_networks(cfg, init.data_shape)
    if init.sampler_state is not None:
        load_numpy_state(sampler, init.sampler_state)
    return sampler, critic, baseline


def adapt_sampler(cfg: Config, sampler: torch.nn.Module) -> torch.nn.Module:
    """``sampler`` with LoRA adapters where ``model.lora_rank`` asks for them (in place; see
    ``sftrl.lora``): its pretrained weights frozen, the adapters and the learned step stds (if any)
    trainable. Applied after the pretrained state is loaded: ``InitState`` holds the plain network's."""
    m = cfg.model
    if not m.lora_rank:
        return sampler
    from sftrl.diffusion.variance import LOG_STD_KEY
    from sftrl.lora import apply_adapters

    keep = [LOG_STD_KEY] if hasattr(sampler, LOG_STD_KEY) else []
    alpha = m.lora_alpha if m.lora_alpha is not None else float(m.lora_rank)
    return apply_adapters(sampler, m.lora_rank, alpha, keep_trainable=keep)


def fresh_sampler(cfg: Config, data_shape: tuple[int, ...]) -> torch.nn.Module:
    """The sampler network initialised from ``pretrain.seed`` (the global RNG is left alone), so
    a pretrained sampler is a function of its cache key."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.pretrain.seed)
        sampler, _, _ = build_networks(cfg, tuple(data_shape), learned_variance=False)  # pretrained: eps only
    return sampler


def _set_up_process(cfg: Config) -> None:
    """What each process of a run sets before building its networks."""
    torch.set_num_threads(cfg.torch_threads)
    set_matmul_precision(cfg.perf.tf32)


def make_rollout_worker(cfg: Config, init: InitState, index: int) -> RolloutWorker:
    _set_up_process(cfg)
    sampler, critic, _ = _networks(cfg, init)
    plan = RunPlan.of(cfg)
    worker = RolloutWorker(
        adapt_sampler(cfg, sampler),
        critic,
        plan.schedule,
        init.data_shape,
        final_step_std=cfg.diffusion.final_step_std,
        reduction=cfg.diffusion.log_prob_reduction,
        device=resolve_device(cfg),
        seed=plan.seeds.rollout_noise,  # the same for every worker: a block's noise follows its id
        worker_id=worker_name(index),
        perf=cfg.perf,
    )
    if cfg.perf.compile:
        warm_up(worker.net, init.data_shape, worker.device, backward=False)
    return worker


def make_learner(cfg: Config, init: InitState) -> Learner:
    _set_up_process(cfg)
    sampler, critic, baseline = _networks(cfg, init)
    a, plan = cfg.algo, RunPlan.of(cfg)
    learner = Learner(
        adapt_sampler(cfg, sampler),
        critic,
        baseline,
        plan.schedule,
        make_algorithm(a.name, a),
        lr=a.policy_lr,
        max_grad_norm=a.max_grad_norm,
        batch_size=plan.batch_size,  # the size of the buffer's draws too: one route for both
        n_generator=plan.n_generator,
        final_step_std=cfg.diffusion.final_step_std,
        reduction=cfg.diffusion.log_prob_reduction,
        data_shape=init.data_shape,
        device=resolve_device(cfg),
        seed=plan.seeds.learner,
        lr_decay_phases=cfg.trainer.iterations if a.policy_lr_decay == "linear" else None,
        ema_decay=a.ema_decay,
        perf=cfg.perf,
        variance_lr=cfg.model.variance_lr,
    )
    if cfg.perf.compile:
        warm_up(learner.ctx.forward, init.data_shape, learner.device, backward=True)
    return learner


def make_critic_learner(cfg: Config, init: InitState, real_data: RealData | None = None) -> CriticLearner:
    """The critic learner; loads the real data itself unless given (Ray actors load their own)."""
    _set_up_process(cfg)
    _, critic, baseline = _networks(cfg, init)
    a = cfg.algo
    data = real_data if real_data is not None else load_real_data(cfg, progress=False)
    if cfg.model.critic_input == "standardised":  # toy sets only (Config.validate): the whole set in memory
        critic.fit_input(torch.as_tensor(data, dtype=torch.float32))
    return CriticLearner(
        critic,
        baseline,
        data if isinstance(data, ImageStore) else TensorData(data),  # images: uint8, a batch converted at a time
        regulariser=a.critic_regulariser,
        lam=a.lam,
        gp_eta=a.gp_eta,
        critic_lr=a.critic_lr,
        baseline_lr=a.baseline_lr,
        device=resolve_device(cfg),
        seed=Seeds(cfg.seed).critic,
    )


def make_replay_buffer() -> ReplayBuffer:
    return ReplayBuffer()

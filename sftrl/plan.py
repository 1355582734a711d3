"""What every component reads of a run, derived once from the config.

``RunPlan.of(cfg)`` turns the config into the things the trainer, the components and the
evaluation share, so no two places derive them differently:

- the sampling schedule (``schedule_of``), and which of its steps are trainable transitions;
- the sizes of Algorithm 1's two phases: ``n_critic`` rollout blocks of ``batch_size`` chains
  (one critic update each), then ``n_generator`` policy steps of ``batch_size`` transitions;
- every seed of the run (``Seeds``), and the names of the rollout workers and of the blocks.

Deriving it checks what only the derivation can: a schedule whose coefficients are not finite,
or one without a single stochastic step for an algorithm that learns from transitions. Those
are ``ConfigError``\\ s naming the key, raised by ``sftrl.config.load`` with the rest.
"""

from __future__ import annotations

import dataclasses
import math

from sftrl.algos import PluginError, algorithm_class, make_algorithm
from sftrl.algos.base import DataNeed
from sftrl.config import Config
from sftrl.configtools import ConfigError
from sftrl.diffusion.schedules import SamplingSchedule, make_schedule
from sftrl.diffusion.step import step_std, trainable_steps


def schedule_of(cfg: Config) -> SamplingSchedule:
    """The sampling schedule of ``cfg.diffusion`` (the one place it is built from the config)."""
    d = cfg.diffusion
    return make_schedule(d.schedule, d.steps, num_train_steps=d.num_train_steps, beta_schedule=d.beta_schedule,
                         kappa=d.kappa, variance=d.variance)


def initial_stds(cfg: Config, schedule: SamplingSchedule):
    """The stds a learned-variance sampler starts from, ``(S + 1,)`` (index 0 unused, step 1's):
    each step's fixed std, ``step.step_std`` (sigma_n, or ``diffusion.final_step_std`` where it is 0).
    On the CPU whatever the default device (the preflight builds networks on ``meta``)."""
    import torch

    n = torch.arange(schedule.num_steps + 1, device="cpu").clamp(min=1)
    return step_std(schedule.tables("cpu", torch.float64), n, cfg.diffusion.final_step_std)


def check_learned_variance(cfg: Config, schedule: SamplingSchedule) -> None:
    """``model.learn_variance``: every step must start above ``model.variance_floor`` (ConfigError)."""
    stds, floor = initial_stds(cfg, schedule), cfg.model.variance_floor
    low = [n for n in range(1, len(stds)) if not float(stds[n]) > floor]
    if not low:
        return
    n = low[0]
    if not float(schedule.tables("cpu").sigma[n]) > 0:  # it starts at final_step_std
        raise ConfigError(
            f"'diffusion.final_step_std' = {cfg.diffusion.final_step_std!r} is invalid with model.learn_variance: "
            f"step n = {n} has sigma = 0 and starts at this std, which must be above model.variance_floor = "
            f"{floor:g} (the paper's image code: 0.001)", key="diffusion.final_step_std")
    raise ConfigError(f"'model.variance_floor' = {floor!r} is invalid: step n = {n} starts at std "
                      f"{float(stds[n]):.3g}; the floor must be below every starting std", key="model.variance_floor")


@dataclasses.dataclass(frozen=True)
class Seeds:
    """Every seed of a run, derived from the config's ``seed`` here and nowhere else.

    The multipliers are primes, so nearby run seeds give unrelated streams, and the offsets tell
    the streams of one run apart. The values are fixed: a changed one changes every number of a
    run, and a resumed run must draw what an uninterrupted one would.
    """

    run: int

    @property
    def networks(self) -> int:
        """The critic's and the baseline's initial weights: the same in every process."""
        return self.run * 1_000_003

    @property
    def rollout_noise(self) -> int:
        """Base of every block's noise: block ``b`` draws from ``block_seed(rollout_noise, b)``."""
        return self.run * 7919 + 101

    @property
    def learner(self) -> int:
        """The learner's generator (the algorithms' own draws, e.g. pathwise SFT's chains)."""
        return self.run * 7919 + 1

    @property
    def critic(self) -> int:
        """The critic actor's generator: real-data batches and the gradient penalty's mixing."""
        return self.run * 7919 + 2

    def buffer_draw(self, iteration: int) -> int:
        """The generator phase's draw from the buffer in ``iteration``."""
        return self.run * 1_000_003 + iteration

    @property
    def evaluation(self) -> int:
        """Evaluation draws (the same at every evaluation, so their differences are the sampler's)."""
        return self.run + 12345


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """The shared derivation of a run (see the module doc)."""

    schedule: SamplingSchedule
    trainable_steps: tuple[int, ...]  # indices k of the schedule's S steps whose transition is stochastic
    n_critic: int  # rollout blocks per iteration, one critic + baseline update each
    n_generator: int  # policy steps per iteration
    batch_size: int  # m: chains per block, transitions per policy step
    data_need: DataNeed  # what the algorithm learns from (``PolicyAlgorithm.data``)
    num_workers: int
    seeds: Seeds
    reference_follows_best: bool = False  # the learner's reference moves to each new best evaluation

    @classmethod
    def of(cls, cfg: Config) -> RunPlan:
        d, a = cfg.diffusion, cfg.algo
        try:
            algorithm = algorithm_class(a.name)
        except PluginError as exc:
            raise ConfigError(f"'algo.name' = {a.name!r} is invalid: {exc.message}", key="algo.name") from None
        schedule = schedule_of(cfg)
        bad = [row["n"] for row in schedule.rows() if not all(math.isfinite(float(v)) for v in row.values())]
        if bad:
            raise ConfigError(f"'diffusion.schedule' = {d.schedule!r} is invalid: its coefficients are not finite at "
                              f"step(s) n = {bad[:5]} with these diffusion.* settings", key="diffusion.schedule")
        if cfg.ray.num_learners > 1 and not algorithm.shardable:
            raise ConfigError(f"'ray.num_learners' = {cfg.ray.num_learners} is invalid: {a.name!r} cannot share its "
                              "batches between learners (each would draw its own chains): use 1", key="ray.num_learners")
        steps = trainable_steps(schedule.sigma, d.final_step_std)
        data_need = algorithm.data
        if data_need != "none" and not steps:
            kappa = f" with kappa = {d.kappa:g}" if d.schedule.startswith("fastdpm") else ""
            raise ConfigError(
                f"'diffusion.schedule' = {d.schedule!r} is invalid: it has sigma = 0 at every step{kappa}, so "
                f"{a.name!r} has no stochastic transition to learn from: set diffusion.final_step_std > 0 (the "
                "paper's image code: 0.001) or use a stochastic schedule", key="diffusion.schedule")
        if cfg.model.learn_variance:
            check_learned_variance(cfg, schedule)
        follows_best = algorithm.needs_reference and make_algorithm(a.name, a).reference_follows_best
        if follows_best:
            check_reference_follows_best(cfg)
        return cls(schedule=schedule, trainable_steps=steps, n_critic=a.n_critic, n_generator=a.n_generator,
                   batch_size=a.batch_size, data_need=data_need, num_workers=cfg.rollout.num_workers,
                   seeds=Seeds(cfg.seed), reference_follows_best=follows_best)

    @property
    def chains_per_iteration(self) -> int:
        return self.n_critic * self.batch_size

    @property
    def transitions_per_block(self) -> int:
        return len(self.trainable_steps) * self.batch_size

    @property
    def worker_names(self) -> tuple[str, ...]:
        return tuple(worker_name(i) for i in range(self.num_workers))

    def block_ids(self, iteration: int) -> list[str]:
        """The ids of iteration ``iteration``'s blocks: fixed, so a block lost and collected again
        is the same block (its noise follows its id) and is never counted twice."""
        return [f"it{iteration}/b{k}" for k in range(self.n_critic)]


def worker_name(index: int) -> str:
    return f"worker-{index}"


def check_reference_follows_best(cfg: Config) -> None:
    """A reference that follows the run's best evaluation (``algo.<name>.reference: best``) needs
    evaluations, and the evaluated weights in the reference's own form (a plain network's)."""
    where = f"algo.{cfg.algo.name}.reference"
    if not cfg.trainer.eval_every:
        raise ConfigError(f"'{where}' = 'best' is invalid with trainer.eval_every = 0: the reference moves to the "
                          "run's best evaluation, and this run evaluates only at its end; set trainer.eval_every "
                          "(e.g. 50), or use 'pretrained'", key=where)
    if cfg.model.lora_rank:
        raise ConfigError(f"'{where}' = 'best' is invalid with model.lora_rank = {cfg.model.lora_rank}: the best "
                          "sampler is evaluated with its adapters merged, which the adapted reference cannot load; "
                          "use 'pretrained' with LoRA", key=where)

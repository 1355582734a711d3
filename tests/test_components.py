"""Plain components (no Ray) built directly and checked against exact update rules.

ReplayBuffer, RolloutWorker, CriticLearner and Learner; then a few dozen iterations of the
synchronous loop of Algorithm 1 on the Gaussian cluster.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from conftest import REPO, assert_close
from sftrl.algos import losses, make_algorithm
from sftrl.buffer import Draw, ReplayBuffer, TrajectoryBlock, block_transitions, gather
from sftrl.config import AlgoConfig, load
from sftrl.critic import CriticLearner, TensorData
from sftrl.data.toy import gaussian_cluster
from sftrl.diffusion.schedules import make_schedule
from sftrl.diffusion.step import denoise_step, rollout, sample
from sftrl.learner import Learner, sampler_state_dict
from sftrl.metrics.wasserstein import sliced_w2
from sftrl.models.toy import ToyBaseline, ToyCritic, ToySampler
from sftrl.rollout import RolloutWorker
from sftrl.weights import Weights, to_numpy_state

torch.set_num_threads(1)

T = 10
HID = 16




# ---------------------------------------------------------------- helpers


def synthetic_block(block_id, version, num_chains, stds=(0.5, 0.3, 0.0), offset=0.0):
    """A block whose entries encode where they come from: xs[k, b] = offset + 100 k + b (+ 0.5 in
    the second coordinate), log_probs[k, b] = -(offset + 100 k + b)."""
    S = len(stds)
    k = np.arange(S + 1).reshape(-1, 1)
    b = np.arange(num_chains).reshape(1, -1)
    code = (offset + 100.0 * k + b).astype(np.float32)  # (S + 1, B)
    xs = np.stack([code, code + 0.5], axis=-1)  # (S + 1, B, 2)
    return TrajectoryBlock(
        xs=xs,
        log_probs=-code[:-1].copy(),
        ns=np.arange(S, 0, -1),
        stds=np.asarray(stds, dtype=np.float32),
        rewards=np.zeros(num_chains, dtype=np.float32),
        version=version,
        block_id=block_id,
    )


def decode(x_n_row, offset):
    """(step index k, chain b) of a synthetic x_n."""
    code = int(round(float(x_n_row[0]) - offset))
    return code // 100, code % 100


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def assert_params_close(module, expected, atol=1e-6):
    for p, e in zip(module.parameters(), expected):
        assert_close(p.detach(), e, rtol=0, atol=atol)


def make_nets(S, seed=0):
    torch.manual_seed(seed)
    return (
        ToySampler(T, hidden=HID),
        ToyCritic(hidden=(HID, HID)),
        ToyBaseline(S, hidden=(HID, HID)),
    )


def make_worker(policy, critic, schedule, *, final_step_std=0.0, seed=0, worker_id="w0", reduction="sum"):
    return RolloutWorker(
        copy.deepcopy(policy),
        copy.deepcopy(critic),
        schedule,
        (2,),
        final_step_std=final_step_std,
        reduction=reduction,
        seed=seed,
        worker_id=worker_id,
    )


# ---------------------------------------------------------------- ReplayBuffer


def test_buffer_sample_fields_and_only_stochastic_transitions():
    buf = ReplayBuffer()
    blocks = [synthetic_block("a", 3, 4), synthetic_block("b", 5, 6, offset=1000.0)]
    buf.add_blocks(blocks)
    assert buf.num_blocks == 2
    assert buf.num_transitions == 2 * 4 + 2 * 6  # the last step (std 0) is not a transition
    assert buf.versions() == [3, 5]
    batch = buf.sample(num_batches=3, batch_size=7, seed=0)
    assert len(batch) == 21
    for i in range(len(batch)):
        block = blocks[0] if batch.x_n[i, 0] < 1000 else blocks[1]
        offset = 0.0 if block.block_id == "a" else 1000.0
        k, b = decode(batch.x_n[i], offset)
        assert block.stds[k] > 0  # only stochastic steps
        np.testing.assert_array_equal(batch.x_n[i], block.xs[k, b])
        np.testing.assert_array_equal(batch.x_prev[i], block.xs[k + 1, b])  # the chain's next state
        np.testing.assert_array_equal(batch.x_0[i], block.xs[-1, b])  # the chain's last state
        assert batch.n[i] == block.ns[k]
        assert batch.log_prob[i] == block.log_probs[k, b]
        assert batch.version[i] == block.version


def test_buffer_batches_are_without_replacement_and_deterministic():
    buf = ReplayBuffer()
    buf.add_blocks([synthetic_block("a", 0, 5), synthetic_block("b", 0, 5, offset=1000.0)])
    total = buf.num_transitions  # 20
    batch = buf.sample(num_batches=50, batch_size=total, seed=1)
    ids = batch.x_n[:, 0].reshape(50, total)
    for row in ids:
        assert len(np.unique(row)) == total  # a full-size batch is a permutation
    again = buf.sample(num_batches=50, batch_size=total, seed=1)
    np.testing.assert_array_equal(again.x_n, batch.x_n)
    # fewer transitions than the batch size: with replacement
    assert len(buf.sample(num_batches=1, batch_size=3 * total, seed=0)) == 3 * total


def test_buffer_sampling_is_uniform_over_transitions_across_block_sizes():
    buf = ReplayBuffer()
    buf.add_blocks([synthetic_block("small", 0, 3), synthetic_block("large", 1, 7, offset=1000.0)])
    total = buf.num_transitions  # 6 + 14
    num_batches, batch_size = 2000, 5
    batch = buf.sample(num_batches, batch_size, seed=0)
    _, counts = np.unique(batch.x_n[:, 0], return_counts=True)
    assert len(counts) == total
    expected = num_batches * batch_size / total  # 500
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = total - 1
    # chi-square with df = 19 has mean 19 and std sqrt(38) ~ 6.2 (sampling without replacement
    # inside a batch only shrinks it); 19 + 6 sd ~ 56 fails only on a real bias, e.g. uniform
    # over *blocks* would put 833 on each small-block transition and give chi2 ~ 700.
    assert chi2 < df + 6 * np.sqrt(2 * df), chi2
    small_share = (batch.version == 0).mean()
    assert small_share == pytest.approx(6 / 20, abs=0.03)


def test_buffer_duplicate_ids_clear_trim_and_all_transitions():
    buf = ReplayBuffer()
    buf.add_blocks(
        [
            synthetic_block("a", 0, 2),
            synthetic_block("b", 1, 3, offset=1000.0),
            synthetic_block("c", 2, 4, offset=2000.0),
        ]
    )
    with pytest.raises(ValueError, match="'b'"):
        buf.add_blocks([synthetic_block("b", 7, 3)])
    everything = buf.all_transitions()
    assert len(everything) == 2 * (2 + 3 + 4)
    # step-major within each block, blocks in insertion order
    np.testing.assert_array_equal(
        everything.x_n[:4], block_transitions(synthetic_block("a", 0, 2)).x_n
    )
    assert buf.trim(min_version=1) == 1
    assert buf.versions() == [1, 2] and buf.num_transitions == 2 * (3 + 4)
    assert set(buf.all_transitions().version.tolist()) == {1, 2}
    assert buf.trim(min_version=1) == 0
    assert buf.clear() == 2
    assert buf.num_transitions == 0 and buf.num_blocks == 0
    with pytest.raises(RuntimeError):
        buf.sample(1, 4, seed=0)
    # an id seen before stays refused after a clear (no double counting)
    with pytest.raises(ValueError, match="'a'"):
        buf.add_blocks([synthetic_block("a", 9, 2)])
    assert buf.state()["blocks_added"] == 3 and buf.state()["transitions_added"] == 18


def test_buffer_discard_forgets_lost_blocks_so_they_can_be_added_again():
    buf = ReplayBuffer()
    buf.add_blocks([synthetic_block("a", 0, 2), synthetic_block("b", 0, 3, offset=1000.0)])
    assert buf.discard(["b", "never-added"]) == 1
    assert buf.num_blocks == 1 and buf.state()["blocks_added"] == 1 and buf.state()["transitions_added"] == 4
    buf.add_blocks([synthetic_block("b", 0, 3, offset=1000.0)])  # collected anew: accepted, counted once
    assert buf.state()["blocks_added"] == 2 and buf.num_transitions == 2 * (2 + 3)
    with pytest.raises(ValueError, match="'a'"):
        buf.add_blocks([synthetic_block("a", 0, 2)])  # a block not discarded stays refused


def test_buffer_resolves_the_blocks_a_draw_needs_in_one_call():
    stored = {"h-a": synthetic_block("a", 0, 2), "h-b": synthetic_block("b", 0, 3, offset=1000.0)}
    calls = []

    def resolve(handles):  # stands in for ray.get on a list of object references
        calls.append(list(handles))
        return [stored[h] for h in handles]

    buf = ReplayBuffer(resolve=resolve)
    for handle, block in stored.items():
        buf.add(handle, block.meta())
    everything = buf.all_transitions()
    assert calls == [["h-a", "h-b"]]
    expected = ReplayBuffer()
    expected.add_blocks(list(stored.values()))
    np.testing.assert_array_equal(everything.x_n, expected.all_transitions().x_n)


def test_a_draw_names_transitions_in_a_few_bytes_and_the_learner_gathers_them_from_the_blocks():
    """The buffer's draw is indices only; ``gather`` makes the same batch from the blocks in any
    order (what the learner is handed), never from blocks the draw does not name, and refuses a
    draw whose blocks are missing."""
    blocks = [synthetic_block("a", 3, 4), synthetic_block("b", 5, 6, offset=1000.0), synthetic_block("c", 5, 2)]
    buf = ReplayBuffer()
    buf.add_blocks(blocks[:2])
    draw = buf.draw(3, 7, seed=0)
    batch = gather(draw, blocks[:2])
    for field in dataclasses.fields(batch):
        np.testing.assert_array_equal(getattr(batch, field.name), getattr(buf.sample(3, 7, seed=0), field.name))
    np.testing.assert_array_equal(gather(draw, [blocks[2], blocks[1], blocks[0]]).x_n, batch.x_n)
    assert draw.block_ids == ("a", "b") and len(draw) == 21
    assert draw.nbytes == 3 * 8 * 21 < batch.nbytes  # image blocks: 24 bytes against 3 images a row
    with pytest.raises(ValueError, match=r"names blocks \['b'\] that were not handed over"):
        gather(draw, blocks[:1])
    with pytest.raises(ValueError, match="empty draw"):
        gather(Draw((), *(np.zeros(0, np.int64),) * 3), blocks)


def test_buffer_refill_replaces_the_last_iterations_blocks_and_draws_from_the_new_ones():
    buf = ReplayBuffer()
    first = [synthetic_block("it0/b0", 0, 2), synthetic_block("it0/b1", 0, 3, offset=1000.0)]
    drawn = buf.refill(first, [b.meta() for b in first], "samples", 2, 4, seed=5)
    expected = ReplayBuffer()
    expected.add_blocks(first)
    np.testing.assert_array_equal(gather(drawn, first).x_n, expected.sample(2, 4, seed=5).x_n)  # add, then sample
    second = [synthetic_block("it1/b0", 1, 4, offset=2000.0)]
    everything = buf.refill(second, [b.meta() for b in second], "all")
    assert buf.versions() == [1] and len(everything) == 2 * 4  # the first iteration's blocks are gone
    np.testing.assert_array_equal(gather(everything, second).x_n, block_transitions(second[0]).x_n)
    assert buf.state()["blocks_added"] == 3
    with pytest.raises(ValueError, match="'everything'"):
        buf.refill([], [], "everything")
    # a failed attempt's blocks can be discarded and added again (the trainer's recovery)
    assert buf.discard(["it1/b0"]) == 1
    buf.refill(second, [b.meta() for b in second], "samples", 1, 2)
    assert buf.state()["blocks_added"] == 3


# ---------------------------------------------------------------- RolloutWorker


@pytest.mark.parametrize(
    "name, final_step_std",
    [("ddpm", 0.0), ("fastdpm-var-linear", 0.0), ("fastdpm-var-linear", 0.001)],
)
def test_rollout_worker_blocks(name, final_step_std):
    S = T if name == "ddpm" else 4
    schedule = make_schedule(name, S, num_train_steps=T, beta_schedule="linear")
    policy, critic, _ = make_nets(S)
    worker = make_worker(policy, critic, schedule, final_step_std=final_step_std, seed=3)
    with pytest.raises(RuntimeError, match="no policy weights"):
        worker.rollout(1, 4)
    worker.set_policy_weights(to_numpy_state(policy), version=7)
    blocks = worker.rollout(num_blocks=3, chains_per_block=5)
    assert len(blocks) == 3 and len({b.block_id for b in blocks}) == 3
    more = worker.rollout(num_blocks=2, chains_per_block=5)
    assert len({b.block_id for b in blocks + more}) == 5  # ids stay unique across calls
    for block in blocks:
        assert block.xs.shape == (S + 1, 5, 2) and block.xs.dtype == np.float32
        assert block.log_probs.shape == (S, 5)
        assert block.ns.tolist() == list(range(S, 0, -1))
        assert block.version == 7
        expected_stds = [r["sigma"] if r["sigma"] > 0 else final_step_std for r in schedule.rows()]
        np.testing.assert_array_equal(block.stds, np.asarray(expected_stds, dtype=np.float32))
        # the env's terminal reward is the critic at x_0
        with torch.no_grad():
            c = critic(torch.from_numpy(block.xs[-1]))
        np.testing.assert_allclose(block.rewards, c.numpy(), rtol=0, atol=1e-6)
    if name == "fastdpm-var-linear" and final_step_std == 0:
        assert blocks[0].num_transitions == (S - 1) * 5  # the deterministic last step is dropped
        assert np.all(blocks[0].log_probs[-1] == 0)

    # Recorded log-probs equal a re-score via denoise_step: ratio exactly 1.
    batch = ReplayBuffer()
    batch.add_blocks(blocks)
    tr = batch.all_transitions().to_torch()
    with torch.no_grad():
        out = denoise_step(
            worker.policy,
            worker.tables,
            tr.x_n,
            tr.n,
            x_prev=tr.x_prev,
            final_step_std=final_step_std,
            reduction="sum",
        )
    assert torch.equal(out.log_prob, tr.log_prob)


def test_rollout_worker_is_deterministic_and_versions_are_sticky():
    schedule = make_schedule("ddpm", T, num_train_steps=T, beta_schedule="sigmoid")
    policy, critic, _ = make_nets(T)
    a = make_worker(policy, critic, schedule, seed=11)
    b = make_worker(policy, critic, schedule, seed=11)
    c = make_worker(policy, critic, schedule, seed=12)
    for w in (a, b, c):
        w.set_policy_weights(to_numpy_state(policy), version=1)
    xa, xb, xc = (w.rollout(1, 6)[0] for w in (a, b, c))
    np.testing.assert_array_equal(xa.xs, xb.xs)
    np.testing.assert_array_equal(xa.log_probs, xb.log_probs)
    assert not np.array_equal(xa.xs, xc.xs)
    # The same version is not reloaded; a new version is.
    other, _, _ = make_nets(T, seed=99)
    a.set_policy_weights(to_numpy_state(other), version=1)
    assert_close(a.policy.out.bias, policy.out.bias, rtol=0, atol=0)
    a.set_policy_weights(to_numpy_state(other), version=2)
    assert_close(a.policy.out.bias, other.out.bias, rtol=0, atol=0)
    assert a.rollout(1, 2)[0].version == 2


def test_a_blocks_noise_follows_its_id_not_its_worker_nor_the_blocks_beside_it():
    """So a lost worker's blocks collected elsewhere, or another number of workers, change nothing."""
    schedule = make_schedule("ddpm", T, num_train_steps=T, beta_schedule="sigmoid")
    policy, critic, _ = make_nets(T)
    one, other, reseeded = (make_worker(policy, critic, schedule, seed=s, worker_id=w)
                            for s, w in ((5, "w0"), (5, "w1"), (6, "w0")))
    for w in (one, other, reseeded):
        w.set_policy_weights(to_numpy_state(policy), version=1)
    ids = ["it0/b0", "it0/b1", "it0/b2"]
    together = {b.block_id: b for b in one.rollout(3, 6, ids)}
    alone = {i: other.rollout(1, 6, [i])[0] for i in reversed(ids)}
    for i in ids:
        np.testing.assert_array_equal(together[i].xs, alone[i].xs)
        np.testing.assert_array_equal(together[i].log_probs, alone[i].log_probs)
    assert not np.array_equal(together["it0/b0"].xs[0], together["it0/b1"].xs[0])  # each block its own noise
    assert not np.array_equal(reseeded.rollout(1, 6, ["it0/b0"])[0].xs, together["it0/b0"].xs)


# ---------------------------------------------------------------- CriticLearner


def _critic_setup(regulariser, S=3, m=8, seed=5):
    policy, critic, baseline = make_nets(S, seed=1)
    schedule = make_schedule("fastdpm-var-linear", S, num_train_steps=T)
    worker = make_worker(policy, critic, schedule, final_step_std=0.001, seed=2)
    worker.set_policy_weights(to_numpy_state(policy), 0)
    blocks = worker.rollout(2, m)
    real = gaussian_cluster(100, seed=0)
    ref_critic, ref_baseline = copy.deepcopy(critic), copy.deepcopy(baseline)
    learner = CriticLearner(
        critic,
        baseline,
        TensorData(real),
        regulariser=regulariser,
        lam=0.5,
        gp_eta=10.0,
        critic_lr=1e-3,
        baseline_lr=2e-3,
        seed=seed,
    )
    return (
        learner,
        blocks,
        ref_critic,
        ref_baseline,
        torch.as_tensor(real),
        torch.Generator().manual_seed(seed),
    )


def _values_loop(baseline, xs, ns):
    """V(x_n, n) per step with a plain loop over steps, (S, m)."""
    m = xs.shape[1]
    return torch.stack([baseline(xs[k], torch.full((m,), int(ns[k]))) for k in range(len(ns))])


def test_critic_learner_B_equals_manual_eq23_and_adam():
    learner, blocks, c_ref, b_ref, real, g = _critic_setup("B")
    c_opt = torch.optim.Adam(c_ref.parameters(), lr=1e-3)
    b_opt = torch.optim.Adam(b_ref.parameters(), lr=2e-3)
    start = params_of(c_ref)
    metrics = learner.update(blocks)
    assert learner.version == 2 and len(metrics) == 2
    for block, got in zip(blocks, metrics):
        xs = torch.from_numpy(block.xs)
        m = xs.shape[1]
        x_real = real[torch.randint(len(real), (m,), generator=g)]
        c_fake, c_real = c_ref(xs[-1]), c_ref(x_real)
        values = _values_loop(b_ref, xs[:-1], block.ns)  # (S, m)
        gap = c_real.mean() - c_fake.mean()
        r_b = ((c_fake.unsqueeze(0) - values) ** 2).sum(0).mean()  # Eq. 21, summed over steps
        loss = -(gap - 0.5 * r_b)  # Eq. 23 with lambda = 0.5
        c_opt.zero_grad()
        b_opt.zero_grad()
        loss.backward()
        c_opt.step()
        b_opt.step()
        assert got[losses.IPM_GAP] == pytest.approx(gap.item(), abs=1e-6)
        assert got[losses.BASELINE_LOSS] == pytest.approx(r_b.item(), rel=1e-5)
        assert got[losses.CRITIC_LOSS] == pytest.approx(loss.item(), abs=1e-6)
    # The last step's gradients and the parameters after both Adam steps agree.
    for p, q in zip(
        list(learner.critic.parameters()) + list(learner.baseline.parameters()),
        list(c_ref.parameters()) + list(b_ref.parameters()),
    ):
        assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
    assert any(not torch.equal(p, s) for p, s in zip(params_of(c_ref), start))  # it moved
    version, weights = learner.get_weights()
    assert version == 2 and set(weights) == {"critic", "baseline"}


def test_critic_learner_GP_equals_manual_penalty_and_mse_baseline():
    learner, blocks, c_ref, b_ref, real, g = _critic_setup("GP")
    c_opt = torch.optim.Adam(c_ref.parameters(), lr=1e-3)
    b_opt = torch.optim.Adam(b_ref.parameters(), lr=2e-3)
    c_start, b_start = params_of(c_ref), params_of(b_ref)
    metrics = learner.update(blocks[:1])
    block = blocks[0]
    xs = torch.from_numpy(block.xs)
    m = xs.shape[1]
    x_real = real[torch.randint(len(real), (m,), generator=g)]
    mix = torch.rand(m, generator=g)
    x_fake = xs[-1]
    c_fake, c_real = c_ref(x_fake), c_ref(x_real)
    x_hat = (mix[:, None] * x_real + (1 - mix[:, None]) * x_fake).requires_grad_(True)
    (grad_x,) = torch.autograd.grad(c_ref(x_hat).sum(), x_hat, create_graph=True)
    penalty = ((grad_x.norm(dim=1) - 1.0) ** 2).mean()  # Eq. 22
    critic_loss = -(c_real.mean() - c_fake.mean() - 10.0 * penalty)
    values = _values_loop(b_ref, xs[:-1], block.ns)
    baseline_loss = ((c_fake.detach().unsqueeze(0) - values) ** 2).sum(0).mean()
    # Separate backward passes: the critic sees only its loss, the baseline only the MSE.
    c_grads = torch.autograd.grad(critic_loss, list(c_ref.parameters()))
    b_grads = torch.autograd.grad(baseline_loss, list(b_ref.parameters()))
    for p, gr in zip(c_ref.parameters(), c_grads):
        p.grad = gr
    for p, gr in zip(b_ref.parameters(), b_grads):
        p.grad = gr
    c_opt.step()
    b_opt.step()
    got = metrics[0]
    assert got[losses.GRADIENT_PENALTY] == pytest.approx(penalty.item(), rel=1e-5)
    assert got[losses.IPM_GAP] == pytest.approx((c_real.mean() - c_fake.mean()).item(), abs=1e-6)
    assert got[losses.BASELINE_LOSS] == pytest.approx(baseline_loss.item(), rel=1e-5)
    for p, gr in zip(learner.critic.parameters(), c_grads):
        assert_close(p.grad, gr, rtol=1e-5, atol=1e-7)
    for p, gr in zip(learner.baseline.parameters(), b_grads):
        assert_close(p.grad, gr, rtol=1e-5, atol=1e-7)
    assert_params_close(learner.critic, params_of(c_ref))
    assert_params_close(learner.baseline, params_of(b_ref))
    assert any(not torch.equal(p, s) for p, s in zip(params_of(c_ref), c_start))
    assert any(not torch.equal(p, s) for p, s in zip(params_of(b_ref), b_start))


def test_critic_learner_rejects_unknown_regulariser():
    _, critic, baseline = make_nets(3)
    with pytest.raises(ValueError, match="'C'"):
        CriticLearner(
            critic,
            baseline,
            TensorData(np.zeros((4, 2))),
            regulariser="C",
            lam=0.1,
            gp_eta=0.1,
            critic_lr=1e-3,
            baseline_lr=1e-3,
        )


# ---------------------------------------------------------------- Learner


def _learner_setup(
    algo_name,
    *,
    S=4,
    n_generator=1,
    batch_size=24,
    max_grad_norm=None,
    lr=1e-3,
    final_step_std=0.001,
    num_chains=12,
    seed=3,
    ema_decay=0.0,
    max_importance_weight=1.0,
    reduction="sum",
):
    policy, critic, baseline = make_nets(S, seed=1)
    # The published critic and baseline differ from the ones the learner was built with.
    _, pub_critic, pub_baseline = make_nets(S, seed=2)
    schedule = make_schedule("fastdpm-var-quadratic", S, num_train_steps=T)
    worker = make_worker(policy, critic, schedule, final_step_std=final_step_std, seed=4, reduction=reduction)
    worker.set_policy_weights(to_numpy_state(policy), 0)
    buf = ReplayBuffer()
    buf.add_blocks(worker.rollout(2, num_chains // 2))
    settings = AlgoConfig(name=algo_name, max_importance_weight=max_importance_weight)
    learner = Learner(
        copy.deepcopy(policy),
        critic,
        baseline,
        schedule,
        make_algorithm(algo_name, settings),
        lr=lr,
        max_grad_norm=max_grad_norm,
        batch_size=batch_size,
        n_generator=n_generator,
        final_step_std=final_step_std,
        reduction=reduction,
        data_shape=(2,),
        seed=seed,
        ema_decay=ema_decay,
    )
    published = Weights(5, {"critic": to_numpy_state(pub_critic), "baseline": to_numpy_state(pub_baseline)})
    return learner, buf, policy, pub_critic, pub_baseline, published, schedule.tables()


@pytest.mark.parametrize("n_generator, max_grad_norm", [(1, None), (2, 0.05)])
def test_learner_sft_pg_step_equals_manual_reinforce(n_generator, max_grad_norm):
    learner, buf, policy, pub_critic, pub_baseline, published, tables = _learner_setup(
        "sft-pg", n_generator=n_generator, max_grad_norm=max_grad_norm, batch_size=16
    )
    data = buf.sample(n_generator, 16, seed=0)
    assert learner.version == 0
    metrics = learner.update_policy(data, published)
    assert learner.version == 1 and learner.critic_version == 5 and len(metrics) == n_generator

    ref = copy.deepcopy(policy)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    tr = data.to_torch()
    for j in range(n_generator):
        mb = tr.select(slice(16 * j, 16 * (j + 1)))
        with torch.no_grad():
            reward = pub_critic(mb.x_0)  # relabelled with the just-published critic
            values = pub_baseline(mb.x_n, mb.n)
        log_prob = denoise_step(
            ref, tables, mb.x_n, mb.n, x_prev=mb.x_prev, final_step_std=0.001
        ).log_prob
        if j == 0:  # before any update the policy is the behaviour policy: ratio exactly 1
            assert torch.equal(log_prob.detach(), mb.log_prob)
        loss = -((reward - values) * log_prob).mean()  # Eq. 20
        opt.zero_grad()
        loss.backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters()))
        if max_grad_norm is not None and norm > max_grad_norm:
            for p in ref.parameters():
                p.grad.mul_(max_grad_norm / (norm + 1e-6))
        opt.step()
        got = metrics[j]
        assert got[losses.POLICY_LOSS] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
        assert got[losses.REWARD_MEAN] == pytest.approx(reward.mean().item(), rel=1e-6)
        assert got["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert metrics[0][losses.RATIO_MIN] == metrics[0][losses.RATIO_MAX] == 1.0
    if max_grad_norm is not None:
        assert metrics[0]["grad_norm"] > max_grad_norm  # the clip was active
    assert_params_close(learner.policy, params_of(ref))
    assert any(
        not torch.equal(p, q) for p, q in zip(learner.policy.parameters(), policy.parameters())
    )
    version, state = learner.get_weights()
    assert version == 1
    assert_close(
        torch.from_numpy(state["out.bias"]), learner.policy.out.bias.detach(), rtol=0, atol=0
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_learner_sft_pg_reweights_stale_transitions_against_theta_at_the_phase_start(reduction):
    """Async mode: transitions from an older version get min(rho-bar, pi_theta / mu), with theta
    as the phase starts (not re-taken after each policy step); current ones keep weight 1. With
    log-probs averaged over the D = 2 dims, the ratio is still the density's."""
    rho_bar = 1.02
    learner, buf, policy, pub_critic, pub_baseline, published, tables = _learner_setup(
        "sft-pg", n_generator=2, batch_size=16, lr=1e-2, max_importance_weight=rho_bar, reduction=reduction
    )
    learner.update_policy(buf.sample(2, 16, seed=7), published)  # theta moves to version 1
    data = buf.sample(2, 16, seed=0)  # collected with version 0
    mixed = np.where(np.arange(len(data)) % 3 == 0, 1, data.version)  # every third row current
    data = dataclasses.replace(data, version=mixed)
    ref = copy.deepcopy(learner.policy)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt.load_state_dict(copy.deepcopy(learner.optimizer.state_dict()))
    metrics = learner.update_policy(data, published)

    tr = data.to_torch()
    with torch.no_grad():
        start = denoise_step(ref, tables, tr.x_n, tr.n, x_prev=tr.x_prev, final_step_std=0.001).log_prob  # sum
        behaviour = tr.log_prob * (2 if reduction == "mean" else 1)
    ratio = (start - behaviour).exp()
    weight = torch.where(tr.version == 1, torch.ones_like(ratio), ratio.clamp(max=rho_bar))
    assert 0 < (ratio[tr.version == 0] > rho_bar).float().mean() < 1  # some cut, some not
    for j in range(2):
        rows = slice(16 * j, 16 * (j + 1))
        mb = tr.select(rows)
        with torch.no_grad():
            advantage = pub_critic(mb.x_0) - pub_baseline(mb.x_n, mb.n)
        log_prob = denoise_step(ref, tables, mb.x_n, mb.n, x_prev=mb.x_prev, final_step_std=0.001,
                                reduction=reduction).log_prob
        loss = -(weight[rows] * advantage * log_prob).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert metrics[j][losses.POLICY_LOSS] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
        assert metrics[j][losses.IMPORTANCE_WEIGHT_MEAN] == pytest.approx(weight[rows].mean().item(), rel=1e-6)
        truncated = ((ratio[rows] > rho_bar) & (mb.version == 0)).float().mean().item()
        assert metrics[j][losses.IMPORTANCE_WEIGHT_TRUNCATED] == pytest.approx(truncated)
    assert_params_close(learner.policy, params_of(ref))
    # all current (sync mode): no weights at all, Eq. 20 exactly
    current = dataclasses.replace(buf.sample(2, 16, seed=1), version=np.full(32, learner.version))
    assert losses.IMPORTANCE_WEIGHT_MEAN not in learner.update_policy(current, published)[0]


def test_learner_ema_averages_theta_for_evaluation_only_and_survives_a_resume():
    decay = 0.75
    learner, buf, policy, *_, published, _ = _learner_setup("sft-pg", ema_decay=decay, lr=1e-2)
    expected = {k: v.detach().clone() for k, v in policy.state_dict().items()}  # the average starts at theta_0
    for it in range(3):
        learner.update_policy(buf.sample(1, 24, seed=it), published)
        for k, v in learner.policy.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v
    version, raw = learner.get_weights()
    ema_version, averaged = learner.get_sampler_weights()
    assert version == ema_version == 3
    for k, v in learner.policy.state_dict().items():
        assert torch.equal(torch.from_numpy(raw[k]), v)  # rollouts run theta itself
        assert_close(torch.from_numpy(averaged[k]), expected[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(torch.from_numpy(averaged["out.bias"]), learner.policy.out.bias)
    # A checkpoint's sampler is the average; a resumed learner carries it on. (A deep copy, as
    # torch.save makes: a live state dict shares the optimiser's moment tensors.)
    state = copy.deepcopy(learner.state_dict())
    assert_close(sampler_state_dict(state)["out.bias"], expected["out.bias"], rtol=1e-6, atol=1e-7)
    resumed, *_ = _learner_setup("sft-pg", ema_decay=decay, lr=1e-2)
    resumed.load_state_dict(state)
    for learner_ in (learner, resumed):
        learner_.update_policy(buf.sample(1, 24, seed=9), published)
    assert_close(
        torch.from_numpy(resumed.get_sampler_weights()[1]["out.bias"]),
        torch.from_numpy(learner.get_sampler_weights()[1]["out.bias"]),
        rtol=1e-6,
        atol=1e-7,
    )
    # Without an average the sampler is theta.
    plain, *_ = _learner_setup("sft-pg")
    plain_state = plain.state_dict()
    assert sampler_state_dict(plain_state) is plain_state["policy"]
    assert plain.get_sampler_weights()[1].keys() == plain.get_weights()[1].keys()


def test_learner_ppo_first_epoch_ratio_is_exactly_one():
    learner, buf, _, _, _, published, _ = _learner_setup(
        "ppo", batch_size=10_000
    )  # one minibatch per epoch
    data = buf.all_transitions()
    metrics = learner.update_policy(data, published)
    assert len(metrics) == AlgoConfig().ppo_epochs == 2
    first, second = metrics
    assert first[losses.RATIO_MIN] == first[losses.RATIO_MAX] == first[losses.RATIO_MEAN] == 1.0
    assert first[losses.APPROX_KL] == 0.0 and first[losses.CLIP_FRACTION] == 0.0
    # the second epoch sees the moved policy, so its ratios are no longer 1
    assert second[losses.RATIO_MIN] < 1.0 < second[losses.RATIO_MAX]
    assert learner.version == 1


def test_learner_ppo_small_minibatches_first_is_ratio_one():
    learner, buf, _, _, _, published, _ = _learner_setup("ppo", batch_size=8)
    data = buf.all_transitions()
    metrics = learner.update_policy(data, published)
    assert len(metrics) == 2 * int(np.ceil(len(data) / 8))
    assert metrics[0][losses.RATIO_MIN] == metrics[0][losses.RATIO_MAX] == 1.0
    assert metrics[-1][losses.RATIO_MIN] != 1.0 or metrics[-1][losses.RATIO_MAX] != 1.0


def test_learner_pathwise_sft_loss_is_minus_mean_critic():
    learner, _, policy, pub_critic, _, published, tables = _learner_setup(
        "sft", batch_size=16, seed=9
    )
    metrics = learner.update_policy(None, published)
    assert len(metrics) == 1
    # Replay the same chains: the learner's generator is seeded with its seed.
    g = torch.Generator().manual_seed(9)
    ref = copy.deepcopy(policy)
    x_start = torch.randn((16, 2), generator=g)
    traj = rollout(ref, tables, x_start, generator=g, final_step_std=0.001)
    loss = -pub_critic(traj.x_0).mean()  # Eq. 14
    assert metrics[0][losses.POLICY_LOSS] == pytest.approx(loss.item(), rel=1e-6, abs=1e-7)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert_params_close(learner.policy, params_of(ref))
    assert any(
        not torch.equal(p, q) for p, q in zip(learner.policy.parameters(), policy.parameters())
    )


# ---------------------------------------------------------------- the synchronous loop


def test_sync_loop_moves_the_sampler_towards_the_gaussian_cluster():
    """Algorithm 1 for 40 iterations: an untrained T = 5 sampler gets measurably closer to the data.

    The data is N((0.5, 0.5), 0.01^2 I); the untrained sampler gives x_0 ~ N(0, ~1), so its SW2 to
    the data is ~1.15, of which the fixed step variances pin ~1.0 (the spread). What fine-tuning can
    fix in 40 iterations is the mean (SW2 -> ~1.05). The policy lr is 2e-3 (the paper's 5e-5 needs
    thousands of iterations; at 5e-3 two of five rollout seeds overshoot). Rollout seeds 0-4 all
    drop SW2 by 0.08-0.12, while three independent evaluation draws of the same sampler differ by
    <= 0.015; so we require the worst final draw to beat the best initial draw by 0.05 (> 3 times
    the draw-to-draw spread).
    """
    S, m, iterations = 5, 64, 40
    torch.manual_seed(0)
    schedule = make_schedule("ddpm", S, num_train_steps=S, beta_schedule="linear")
    policy = ToySampler(S, hidden=32)
    critic, baseline = ToyCritic(hidden=(32, 32)), ToyBaseline(S, hidden=(32, 32))
    data = gaussian_cluster(2000, seed=0)
    critic_learner = CriticLearner(
        copy.deepcopy(critic),
        copy.deepcopy(baseline),
        TensorData(data),
        regulariser="B",
        lam=0.1,
        gp_eta=0.001,
        critic_lr=1e-3,
        baseline_lr=1e-3,
        seed=0,
    )
    learner = Learner(
        copy.deepcopy(policy),
        critic,
        baseline,
        schedule,
        make_algorithm("sft-pg", AlgoConfig()),
        lr=2e-3,
        max_grad_norm=None,
        batch_size=m,
        n_generator=1,
        final_step_std=0.0,
        reduction="sum",
        data_shape=(2,),
        seed=0,
    )
    worker = make_worker(policy, critic, schedule, seed=0)
    buf = ReplayBuffer()

    def sw2_draws():
        tables = schedule.tables()
        return [
            sliced_w2(
                sample(
                    learner.policy, tables, 2000, (2,), generator=torch.Generator().manual_seed(s)
                ).numpy(),
                data,
                seed=0,
            )
            for s in range(3)
        ]

    before = sw2_draws()
    assert max(before) - min(before) < 0.02  # the evaluation noise the threshold is built on
    gaps = []
    for it in range(iterations):
        version, weights = learner.get_weights()  # 1. publish theta
        worker.set_policy_weights(weights, version)
        blocks = worker.rollout(5, m)  # 2. n_critic = 5 blocks of m chains
        buf.add_blocks(blocks)
        gaps.append(np.mean([x[losses.IPM_GAP] for x in critic_learner.update(blocks)]))
        critic_weights = critic_learner.get_weights()  # 3. publish (alpha, omega)
        worker.set_critic_weights(critic_weights[1]["critic"], critic_weights[0])
        learner.update_policy(buf.sample(1, m, seed=it), critic_weights)  # 4. generator phase
        assert buf.clear() == 5  # 5. sync mode: clear
    after = sw2_draws()
    assert learner.version == iterations and critic_learner.version == 5 * iterations
    assert max(after) < min(before) - 0.05, (before, after)
    # the critic learned to tell the sampler from the data: its IPM estimate grew
    assert np.mean(gaps[-5:]) > np.mean(gaps[:5]) + 0.1


def test_cuda_device_without_a_gpu_is_a_config_error(monkeypatch):
    from sftrl.components import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load(REPO / "configs" / "smoke.yaml", ["device=cuda", "ray.backend=local"])
    with pytest.raises(ValueError, match=r"device: 'cuda' was asked for .* valid here: auto or cpu"):
        resolve_device(cfg)
    assert resolve_device(load(REPO / "configs" / "smoke.yaml", ["device=auto"])) == "cpu"


def test_resource_check_errors_on_a_fixed_cluster_and_warns_on_a_joined_one():
    from sftrl.distributed.system import check_resources
    from sftrl.handles import ResourceError

    cfg = load(REPO / "configs" / "smoke.yaml", ["rollout.num_workers=4", "rollout.num_cpus_per_worker=1"])
    assert check_resources(cfg, {"CPU": 4.0}, fixed=True) is None
    with pytest.raises(ResourceError, match=r"CPU: 4 asked \(rollout.num_workers=4 x rollout.num_cpus_per_worker=1\), "
                                            r"the cluster has 2"):
        check_resources(cfg, {"CPU": 2.0}, fixed=True)
    warning = check_resources(cfg, {"CPU": 2.0}, fixed=False)
    assert warning.startswith("warning:") and "an autoscaler may add nodes" in warning


def test_cuda_device_through_ray_needs_a_gpu_share_for_every_actor():
    from sftrl.configtools import ConfigError
    from sftrl.distributed.system import actor_config

    with pytest.raises(ConfigError, match=r"'device' = 'cuda'.*ray.learner_num_gpus=0, ray.critic_num_gpus=0"):
        load(REPO / "configs" / "smoke.yaml", ["device=cuda", "rollout.num_gpus_per_worker=0.5"])
    cfg = load(REPO / "configs" / "smoke.yaml", ["rollout.num_gpus_per_worker=0.5"])  # device: auto
    assert actor_config(cfg, 0.5).device == "cuda" and actor_config(cfg, 0.0).device == "cpu"
    explicit = load(REPO / "configs" / "smoke.yaml", ["device=cpu", "rollout.num_gpus_per_worker=0.5"])
    assert actor_config(explicit, 0.5).device == "cpu"


def test_a_standardised_critic_sees_the_real_data_at_unit_scale_and_its_stats_travel_with_its_weights():
    from sftrl.components import InitState, fresh_sampler, make_critic_learner, make_learner

    cfg = load(REPO / "configs" / "gaussian-t2.yaml",
               ["model.critic_input=standardised", "model.critic_hidden=[8]", "model.baseline_hidden=[8]",
                "model.learn_variance=false", "model.variance_lr=null", "algo.entropy_coef=0"])
    data = gaussian_cluster(2000, seed=0)  # centre (0.5, 0.5), std 0.01
    critic_learner = make_critic_learner(cfg, InitState(None, (2,)), real_data=data)
    critic = critic_learner.critic
    assert_close(critic.input_mean, torch.as_tensor(data.mean(0), dtype=torch.float32), rtol=0, atol=1e-6)
    assert_close(critic.input_std, torch.as_tensor(data.std(0, ddof=1), dtype=torch.float32), rtol=1e-4, atol=0)
    x = torch.as_tensor(data[:16], dtype=torch.float32)
    z = (x - critic.input_mean) / critic.input_std
    assert 0.3 < float(z.std()) < 3.0  # the cluster at unit scale, not at 0.01
    assert_close(critic(x), critic.net(z).squeeze(-1), rtol=1e-6, atol=1e-6)
    # The learner's critic (built with identity stats) gets them with the published weights.
    learner = make_learner(cfg, InitState(to_numpy_state(fresh_sampler(cfg, (2,))), (2,)))
    assert torch.equal(learner.ctx.critic.input_std, torch.ones(2))
    learner.set_critic_weights(critic_learner.get_weights())
    assert torch.equal(learner.ctx.critic.input_mean, critic.input_mean)
    assert torch.equal(learner.ctx.critic.input_std, critic.input_std)
    # A raw critic keeps the state-dict keys of every checkpoint written before the option.
    assert "input_mean" not in ToyCritic(hidden=(8,)).state_dict()
    with pytest.raises(ValueError, match="built without input standardisation"):
        ToyCritic(hidden=(8,)).fit_input(x)


def test_input_stats_floor_a_constant_coordinate_and_refuse_too_few_samples():
    from sftrl.models.toy import input_stats

    mean, std = input_stats(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), floor=1e-3)
    assert_close(mean, torch.tensor([2.0, 2.0]))
    assert_close(std, torch.tensor([2.0 ** 0.5, 1e-3]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        input_stats(torch.ones(1, 2))


def test_critic_input_standardised_is_refused_for_images():
    from sftrl.configtools import ConfigError

    with pytest.raises(ConfigError, match="'model.critic_input' = 'standardised' is invalid: standardises a 2-D toy"):
        load(REPO / "configs" / "digits.yaml", ["model.critic_input=standardised"])

"""LoRA (``model.lora_rank``): adapters where intended over a frozen base, a publication of the
trainable tensors alone that a rollout worker applies over the base it got once (ratio exactly 1),
the merge into a plain network, the checkpoint, the config's checks, and a tiny image run that
resumes, samples and exports."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_image_e2e import TINY, tiny_unet, write_cifar_batches
from torch import nn

from conftest import REPO, assert_close, run_cli
from sftrl.algos import losses
from sftrl.buffer import ReplayBuffer
from sftrl.components import (
    InitState,
    adapt_sampler,
    fresh_sampler,
    make_critic_learner,
    make_learner,
    make_rollout_worker,
)
from sftrl.config import load
from sftrl.configtools import ConfigError
from sftrl.diffusion.step import denoise_step
from sftrl.diffusion.variance import LOG_STD_KEY
from sftrl.learner import sampler_state_dict
from sftrl.lora import (
    PEFT_INSTALL,
    adapted_layers,
    adapter_state,
    apply_adapters,
    load_adapter_state,
    merge_into,
    merged_state,
)
from sftrl.models import attach_variance, build_networks
from sftrl.models.toy import ToySampler
from sftrl.weights import Weights, frozen_keys, numpy_state, to_numpy_state, trainable_keys

pytest.importorskip("peft")
torch.set_num_threads(1)
SMOKE = REPO / "configs" / "smoke.yaml"


def _inputs(shape: tuple[int, ...], t_max: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((4, *shape), generator=g), torch.randint(0, t_max, (4,), generator=g).float()


def _perturb_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter a non-zero update (B starts at 0, where a merge is trivially right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in adapter_state(model).items():
            if ".lora_B." in key:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=g))


def _toy(overrides: list[str]):
    """A toy LoRA learner from the plain pretrained-shaped state, a worker started as a Ray worker
    is (no sampler state: it gets the base and the adapters with its calls) and a critic."""
    cfg = load(SMOKE, ["model.lora_rank=2", *overrides])
    sampler = fresh_sampler(cfg, (2,))
    attach_variance(sampler, cfg, (2,))
    init = InitState(to_numpy_state(sampler), (2,))
    learner = make_learner(cfg, init)
    worker = make_rollout_worker(cfg, InitState(None, (2,)), 0)
    critic = make_critic_learner(cfg, init, real_data=torch.randn(256, 2, generator=torch.Generator().manual_seed(0)))
    return cfg, init, learner, worker, critic


# ---------------------------------------------------------------- where the adapters go


def test_adapters_go_on_every_unet_conv_and_attention_projection_and_the_base_is_frozen():
    unet = tiny_unet(1, 8).eval()
    x, t = _inputs((1, 8, 8), 1000)
    with torch.no_grad():
        before = unet(x, t)
    convs = {name for name, m in unet.named_modules() if isinstance(m, nn.Conv2d)}
    assert {"mid.attn_1.q", "mid.attn_1.k", "mid.attn_1.v", "mid.attn_1.proj_out", "conv_in", "conv_out"} <= convs
    apply_adapters(unet, 2, 2.0)
    assert set(adapted_layers(unet)) == convs
    assert type(unet.temb.dense[0]) is nn.Linear and type(unet.mid.block_1.temb_proj) is nn.Linear  # not adapted
    trainable = trainable_keys(unet)
    assert sorted(trainable) == sorted(adapter_state(unet)) and len(trainable) == 2 * len(convs)  # A and B each
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in trainable)
    assert unet.mid.attn_1.q.lora_A["default"].out_channels == 2  # rank 2
    with torch.no_grad():
        assert torch.equal(unet(x, t), before)  # B starts at 0: the adapted network is the pretrained one


def test_the_toy_mlp_gets_adapters_on_its_linear_layers_and_keeps_a_named_tensor_trainable():
    toy = ToySampler(10, hidden=16)
    toy.register_parameter(LOG_STD_KEY, nn.Parameter(torch.zeros(3)))
    apply_adapters(toy, 2, 4.0, keep_trainable=[LOG_STD_KEY])
    assert set(adapted_layers(toy)) == {"layers.0.linear", "layers.1.linear", "layers.2.linear", "out"}
    assert set(trainable_keys(toy)) == {*adapter_state(toy), LOG_STD_KEY}
    assert "layers.0.embedding.weight" in frozen_keys(toy)  # the per-step gains are base weights
    assert adapted_layers(toy)["out"].scaling["default"] == 2.0  # alpha / r
    with pytest.raises(ValueError, match="does not have"):
        apply_adapters(ToySampler(10, hidden=16), 2, 2.0, keep_trainable=["nope"])


def test_merging_gives_the_adapted_networks_outputs_in_a_plain_network():
    unet = tiny_unet(1, 8).eval()
    x, t = _inputs((1, 8, 8), 1000)
    with torch.no_grad():
        base_out = unet(x, t)
    apply_adapters(unet, 2, 3.0)
    _perturb_adapters(unet)
    plain = merge_into(unet, tiny_unet(1, 8, seed=1).eval())
    assert not adapted_layers(plain) and set(plain.state_dict()) == set(tiny_unet(1, 8).state_dict())
    with torch.no_grad():
        adapted_out, merged_out = unet(x, t), plain(x, t)
    assert not torch.allclose(adapted_out, base_out, atol=1e-3)  # the adapters do change the network
    assert_close(merged_out, adapted_out, rtol=1e-4, atol=1e-5)

    toy = ToySampler(10, hidden=16)
    apply_adapters(toy, 2, 2.0)
    _perturb_adapters(toy, seed=1)
    xt, tt = _inputs((2,), 10)
    with torch.no_grad():
        assert_close(merge_into(toy, ToySampler(10, hidden=16))(xt, tt), toy(xt, tt), rtol=1e-5, atol=1e-6)

    other = tiny_unet(1, 8, seed=2)
    apply_adapters(other, 2, 3.0)
    load_adapter_state(other, adapter_state(unet))
    assert all(torch.equal(v, adapter_state(other)[k]) for k, v in adapter_state(unet).items())


# ---------------------------------------------------------------- learner and rollout worker


def test_a_policy_step_moves_only_the_adapters_and_the_learned_stds():
    cfg, init, learner, worker, critic = _toy(["model.learn_variance=true", "algo.policy_lr=1e-2"])
    trainable = set(trainable_keys(learner.policy))
    assert LOG_STD_KEY in trainable and len(trainable) == 1 + 2 * 4  # A and B of 4 linear layers
    assert sum(len(g["params"]) for g in learner.optimizer.param_groups) == len(trainable)
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    cw = critic.get_weights()
    *blocks, _ = worker.collect(learner.get_weights(), cw, ["a", "b"], 64, learner.get_base_weights())
    buf = ReplayBuffer()
    buf.add_blocks(blocks)
    learner.update_policy(buf.sample(1, 64, seed=0), cw)
    after = learner.policy.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    # B moves from 0 at once; A's gradient is B^T (...) = 0 in that first step, so A waits a step.
    assert {k for k in trainable if ".lora_B." in k} | {LOG_STD_KEY} <= moved <= trainable


def test_a_worker_applying_the_publications_over_the_base_rescores_exactly():
    cfg, init, learner, worker, critic = _toy(["algo.n_generator=1"])
    pub, base = learner.get_weights(), learner.get_base_weights()
    assert set(pub.state) == set(trainable_keys(learner.policy)) == set(adapter_state(learner.policy))
    assert set(base.state) == set(frozen_keys(learner.policy))
    assert set(pub.state) | set(base.state) == set(learner.policy.state_dict())
    cw = critic.get_weights()
    with pytest.raises(RuntimeError, match="no frozen base was given"):
        worker.collect(pub, cw, ["x"], 4)
    for version in range(3):  # before any update, then over moved adapters
        *blocks, summary = worker.collect(pub, cw, [f"{version}/a", f"{version}/b"], 64, base)
        assert summary["policy_version"] == version and worker.base_version == 0
        buf = ReplayBuffer()
        buf.add_blocks(blocks)
        tr = buf.all_transitions().to_torch()
        with torch.no_grad():
            out = denoise_step(learner.policy, learner.ctx.tables, tr.x_n, tr.n, x_prev=tr.x_prev,
                               final_step_std=cfg.diffusion.final_step_std, reduction=cfg.diffusion.log_prob_reduction)
        assert torch.equal(out.log_prob, tr.log_prob)  # the worker's policy is the learner's: ratio exactly 1
        metrics = learner.update_policy(buf.sample(1, 64, seed=version), cw)
        assert metrics[0][losses.RATIO_MIN] == metrics[0][losses.RATIO_MAX] == 1.0
        pub = learner.get_weights()


def test_a_publication_is_under_5_percent_of_full_fine_tunings_on_the_cifar10_unet():
    overrides = ["ray.backend=local", "device=cpu", "model.checkpoint=null", "model.lora_rank=4"]
    learner = make_learner(load(REPO / "configs" / "cifar10.yaml", overrides), InitState(None, (3, 32, 32)))
    plain = numpy_state(merged_state(learner.policy))  # what full fine-tuning publishes: the whole U-Net
    assert sum(a.size for a in plain.values()) == 35_746_307
    published = len(pickle.dumps(learner.get_weights(), protocol=5))
    full = len(pickle.dumps(Weights(0, plain), protocol=5))
    assert published < 0.05 * full, (published, full)
    assert published > sum(a.nbytes for a in learner.get_weights().state.values())  # bytes measured, not a formula


def test_the_checkpoint_holds_the_base_once_with_the_averaged_adapters_and_loads_back():
    cfg, init, learner, worker, critic = _toy(["algo.ema_decay=0.5"])
    cw = critic.get_weights()
    *blocks, _ = worker.collect(learner.get_weights(), cw, ["a"], 64, learner.get_base_weights())
    buf = ReplayBuffer()
    buf.add_blocks(blocks)
    for seed in range(2):
        learner.update_policy(buf.sample(1, 64, seed=seed), cw)
    state = learner.state_dict()
    trainable = set(trainable_keys(learner.policy))
    assert set(state["policy"]) == set(learner.policy.state_dict())  # the base once, and the adapters
    assert {k.removeprefix("module.") for k in state["ema"] if k.startswith("module.")} == trainable
    sampler = sampler_state_dict(state)
    assert set(sampler) == set(state["policy"])
    assert all(torch.equal(sampler[k], state["ema"][f"module.{k}"]) for k in trainable)
    assert not all(torch.equal(sampler[k], state["policy"][k]) for k in trainable)  # the average, not theta

    again = make_learner(cfg, init)
    again.load_state_dict(state)
    assert again.base_version == 1  # the checkpoint's base: the workers load it again
    for a, b in ((learner.get_weights(), again.get_weights()), (learner.get_sampler_weights(), again.get_sampler_weights())):
        assert a.state.keys() == b.state.keys() and all(np.array_equal(a.state[k], b.state[k]) for k in a.state)
    # What evaluation and pictures get: the plain network's state, the averaged adapters merged in.
    evaluated = learner.get_sampler_weights().state
    assert set(evaluated) == set(init.sampler_state)
    assert not np.array_equal(evaluated["out.weight"], init.sampler_state["out.weight"])
    worker.collect(again.get_weights(), cw, ["b"], 4, again.get_base_weights())
    assert worker.base_version == 1


# ---------------------------------------------------------------- config and install


def test_config_mistakes_and_a_missing_peft_are_one_line_naming_the_key(monkeypatch):
    with pytest.raises(ConfigError, match=r"model\.lora_rank"):
        load(SMOKE, ["model.lora_rank=-1"])
    with pytest.raises(ConfigError, match=r"'model.lora_alpha' = 8.0 is invalid: .*model.lora_rank > 0"):
        load(SMOKE, ["model.lora_alpha=8"])
    assert load(SMOKE, ["model.lora_rank=4", "model.lora_alpha=8"]).model.lora_alpha == 8.0

    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    with pytest.raises(ConfigError) as err:
        load(SMOKE, ["model.lora_rank=2"])
    message = str(err.value)
    assert "\n" not in message and "model.lora_rank" in message and PEFT_INSTALL in message
    assert PEFT_INSTALL == "pip install 'sftrl[lora]'"
    with pytest.raises(ConfigError, match=r"pip install 'sftrl\[lora\]'"):
        apply_adapters(ToySampler(10, hidden=16), 2, 2.0)
    assert load(SMOKE).model.lora_rank == 0  # without LoRA nothing needs peft


def test_the_lora_extra_bounds_peft_and_ci_installs_it():
    from test_packaging import PROJECT, requirements

    extras = PROJECT["optional-dependencies"]
    spec = requirements(extras["lora"])["peft"]
    assert spec.contains("0.21.2") and not spec.contains("1.0.0")
    assert requirements(extras["dev"])["peft"] == spec


# ---------------------------------------------------------------- end to end


def test_a_tiny_lora_image_run_resumes_samples_and_exports_a_plain_unet(tmp_path):
    from sftrl.checkpoint import latest_checkpoint, load_checkpoint
    from sftrl.models import load_diffusers_unet

    data = write_cifar_batches(tmp_path / "cifar")
    pretrained = tiny_unet(3, 32).state_dict()
    torch.save(pretrained, tmp_path / "ddpm.pt")
    run_dir, env = tmp_path / "run", {"TORCH_HOME": str(tmp_path / "torch-home")}
    first = run_cli(["sftrl.run", "configs/cifar10.yaml", *TINY, f"pretrain.cache_dir={tmp_path / 'cache'}",
                     f"data.path={data}", f"model.checkpoint={tmp_path / 'ddpm.pt'}", "model.lora_rank=2",
                     "trainer.iterations=1", "--run-dir", str(run_dir), "--no-progress"], env=env, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["iteration"] == 1
    policy = state["learner"]["policy"]
    for key, value in pretrained.items():  # the base never moved
        layer, _, tensor = key.rpartition(".")
        assert torch.equal(policy.get(key, policy.get(f"{layer}.base_layer.{tensor}")), value), key
    adapters = [k for k in policy if ".lora_" in k]
    assert adapters and len(state["learner"]["optimizer"]["state"]) <= len(adapters)  # Adam holds the adapters only

    resumed = run_cli(["sftrl.run", "--run-dir", str(run_dir), "--resume", "auto", "trainer.iterations=2",
                       "--no-progress"], env=env, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "policy/policy_loss" in line]
    assert [line["iteration"] for line in train] == [1, 2]
    assert train[0]["policy/ratio_min"] <= 1.0 <= train[0]["policy/ratio_max"]
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["iteration"] == 2

    npz = tmp_path / "samples.npz"
    sample = run_cli(["sftrl.cli", "sample", str(run_dir), "-n", "4", "--batch-size", "4", "--out", str(npz)],
                     timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    with np.load(npz) as f:
        assert [a.shape for a in f.values()][0][0] == 4

    out = tmp_path / "exported"
    export = run_cli(["sftrl.cli", "export", str(run_dir), "--format", "diffusers", "--out", str(out)], timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    cfg = load(run_dir / "config.yaml")
    adapted = adapt_sampler(cfg, build_networks(cfg, (3, 32, 32))[0])
    adapted.load_state_dict(sampler_state_dict(state["learner"]))
    merged = merged_state(adapted)
    exported = load_diffusers_unet(out).state_dict()
    assert set(exported) == set(pretrained) and all(torch.equal(exported[k], merged[k]) for k in exported)
    assert any(not torch.equal(exported[k], pretrained[k]) for k in exported)  # fine-tuned, not the base
    # The exported folder loads into the plain U-Net with peft unavailable.
    check = ("import sys; sys.modules['peft'] = None; from sftrl.models import load_diffusers_unet; "
             f"print(sum(v.numel() for v in load_diffusers_unet({str(out)!r}).state_dict().values()))")
    loaded = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert int(loaded.stdout.strip()) == sum(v.numel() for v in pretrained.values())

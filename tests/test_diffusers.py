"""The diffusers bridge: UNet2DModel folders in, fine-tuned samplers out.

Reference networks are random ``UNet2DModel``s built by diffusers itself from the configurations
of the two public DDPM repositories (written out below; nothing is downloaded). The CelebA-HQ
256 network (113.7M parameters) is loaded at 256 as published, and its noise is compared at 64x64
(the same weights: a diffusers U-Net takes any size, and sftrl's attention stays at the same level);
a forward pass at 256 takes about 30 s a network on two cores.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from sftrl.configtools import ConfigError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from test_image_e2e import (  # noqa: E402
    ITERATIONS,
    TINY,
    assert_complete_image_run,
    run_image_config,
    write_cifar_batches,
)

from sftrl.config import load  # noqa: E402
from sftrl.diffusion.betas import make_betas  # noqa: E402
from sftrl.models import load_diffusers_unet, save_diffusers_unet  # noqa: E402
from sftrl.models.diffusers_unet import (  # noqa: E402
    DIFFUSERS_DEFAULTS,
    DiffusersFormatError,
    diffusers_key,
    from_diffusers_state_dict,
    from_diffusers_tensor,
    scheduler_config,
)
from sftrl.models.unet import UNet  # noqa: E402

# config.json of google/ddpm-cifar10-32 and google/ddpm-celebahq-256 (the settings that build the network).
CIFAR10_32 = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CELEBAHQ_256 = {
    **CIFAR10_32,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "sample_size": 256,
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
# Their scheduler_config.json: Ho et al.'s linear betas.
DDPM_SCHEDULER = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
                  "variance_type": "fixed_large", "clip_sample": True}
# A small layout with every kind of part: width changes (1x1 shortcuts), attention blocks that
# downsample and upsample, a level without attention.
SMALL = {**CIFAR10_32, "block_out_channels": [32, 64, 64], "layers_per_block": 1, "sample_size": 16,
         "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
         "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"]}
FIXTURES = Path(__file__).parent / "fixtures"
# Timesteps as sftrl queries them: integers and FastDPM's fractional ones.
TIMESTEPS = [0.0, 616.734, 999.0, 10.5]


def diffusers_unet(config: dict, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()


def max_noise_diff(reference: UNet2DModel, unet: UNet, size: int, batch: int) -> float:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, reference.config.in_channels, size, size, generator=generator)
    t = torch.tensor(TIMESTEPS[:batch])
    with torch.no_grad():
        expected = reference(x, t).sample
        assert expected.abs().max() > 0.1  # a real output, not a near-zero one that any map matches
        return (unet.eval()(x, t) - expected).abs().max().item()


def test_defaults_are_diffusers_own():
    """An omitted config.json setting means UNet2DModel's default; the table must be that default."""
    signature = inspect.signature(UNet2DModel.__init__).parameters
    actual = {k: list(p.default) if isinstance(p.default, tuple) else p.default
              for k, p in signature.items() if k != "self"}
    assert DIFFUSERS_DEFAULTS == actual


def test_cifar10_32_loads_strictly_and_predicts_the_same_noise(tmp_path):
    reference = diffusers_unet(CIFAR10_32)
    assert sum(p.numel() for p in reference.parameters()) == 35_746_307
    reference.save_pretrained(tmp_path / "ddpm-cifar10-32")
    unet = load_diffusers_unet(tmp_path / "ddpm-cifar10-32")
    assert (unet.ch, unet.ch_mult, unet.num_res_blocks, unet.attn_resolutions) == (128, (1, 2, 2, 2), 2, (16,))
    # every key and shape of the DDIM release (the fixture lists them) has its diffusers tensor
    release = json.loads((FIXTURES / "ddim_unet_cifar10_state_dict.json").read_text())["entries"]
    renamed = {diffusers_key(k, 4): (k, shape) for k, shape in release}
    assert set(renamed) == set(reference.state_dict())
    for d_key, (key, shape) in renamed.items():
        assert list(from_diffusers_tensor(key, reference.state_dict()[d_key]).shape) == shape
    assert max_noise_diff(reference, unet, 32, batch=4) <= 1e-5


def test_celebahq_256_loads_strictly_and_predicts_the_same_noise(tmp_path):
    reference = diffusers_unet(CELEBAHQ_256)
    assert sum(p.numel() for p in reference.parameters()) == 113_673_219
    reference.save_pretrained(tmp_path / "ddpm-celebahq-256")
    unet = load_diffusers_unet(tmp_path / "ddpm-celebahq-256")
    assert (unet.ch_mult, unet.attn_resolutions, unet.resolution) == ((1, 1, 2, 2, 4, 4), (16,), 256)
    # The same weights in sftrl's U-Net for 64x64 inputs: attention at level 4 (64 / 16 = 4).
    at_64 = UNet(128, 3, (1, 1, 2, 2, 4, 4), 2, (4,), 0.0, 3, 64)
    at_64.load_state_dict(unet.state_dict(), strict=True)
    del unet
    assert max_noise_diff(reference, at_64, 64, batch=1) <= 1e-5


def test_a_sampler_round_trips_through_diffusers_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    unet = UNet(32, 3, (1, 2, 2), 2, (16, 8), 0.1, 3, 32)  # attention on two levels, and in the middle
    save_diffusers_unet(unet, tmp_path / "export")
    reloaded = UNet2DModel.from_pretrained(tmp_path / "export").eval()  # what a diffusers user does
    assert max_noise_diff(reloaded, unet, 32, batch=2) <= 1e-5
    reloaded.save_pretrained(tmp_path / "resaved")
    reloaded.save_pretrained(tmp_path / "resaved-bin", safe_serialization=False)  # the .bin layout
    for folder in ("resaved", "resaved-bin"):
        back = load_diffusers_unet(tmp_path / folder)
        assert back.dropout == 0.1 and back.attn_resolutions == (16, 8)
        original, returned = unet.state_dict(), back.state_dict()
        assert list(returned) == list(original)
        assert all(torch.equal(original[k], returned[k]) for k in original)


def test_a_pipeline_folder_is_read_through_its_unet(tmp_path):
    diffusers_unet(SMALL).save_pretrained(tmp_path / "pipe" / "unet")
    DDPMScheduler(**DDPM_SCHEDULER).save_pretrained(tmp_path / "pipe" / "scheduler")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    assert load_diffusers_unet(tmp_path / "pipe").resolution == 16


def test_strict_mapping_names_the_diffusers_keys():
    reference = diffusers_unet(SMALL)
    state = dict(reference.state_dict())
    state.pop("mid_block.attentions.0.to_q.weight")
    state["extra.weight"] = torch.zeros(1)
    unet = UNet(32, 3, (1, 2, 2), 1, (16, 8), 0.0, 3, 16)
    with pytest.raises(ValueError) as err:
        from_diffusers_state_dict(state, {k: v.shape for k, v in unet.state_dict().items()}, "folder")
    assert "mid_block.attentions.0.to_q.weight" in str(err.value) and "extra.weight" in str(err.value)


def _changed(key: str, value) -> dict:
    return {**SMALL, key: value}


# Each setting sftrl's U-Net cannot represent, with a value diffusers builds.
UNSUPPORTED = [
    ("act_fn", "gelu"),
    ("norm_num_groups", 16),
    ("norm_eps", 1e-5),
    ("attention_head_dim", 8),
    ("attn_norm_num_groups", 16),
    ("resnet_time_scale_shift", "scale_shift"),
    ("flip_sin_to_cos", True),
    ("freq_shift", 0),
    ("time_embedding_type", "fourier"),
    ("time_embedding_dim", 64),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("add_attention", False),
    ("center_input_sample", True),
    ("mid_block_scale_factor", 2),
    ("mid_block_type", None),
    ("downsample_padding", 1),
    ("downsample_type", "resnet"),
    ("upsample_type", "resnet"),
    ("down_block_types", ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"]),
    ("block_out_channels", [64, 96, 64]),
]


def _network_differs(a: UNet2DModel, b: UNet2DModel) -> bool:
    """Different parameters, or the same ones computing something else."""
    sa, sb = a.state_dict(), b.state_dict()
    if {k: v.shape for k, v in sa.items()} != {k: v.shape for k, v in sb.items()}:
        return True
    b.load_state_dict(sa)
    x, t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    with torch.no_grad():
        return not torch.allclose(a(x, t).sample, b(x, t).sample, atol=1e-6)


@pytest.mark.parametrize(("key", "value"), UNSUPPORTED, ids=[k for k, _ in UNSUPPORTED])
def test_each_unsupported_setting_is_named_in_one_line(tmp_path, key, value):
    changed = diffusers_unet(_changed(key, value))  # diffusers builds it ...
    assert _network_differs(diffusers_unet(SMALL), changed)  # ... and it is another network
    changed.save_pretrained(tmp_path / "m")
    with pytest.raises(DiffusersFormatError) as err:
        load_diffusers_unet(tmp_path / "m")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "m" / "config.json") in message
    assert f"{key} = {json.dumps(value)} (supported: " in message


def test_every_problem_is_named_at_once(tmp_path):
    diffusers_unet({**SMALL, "act_fn": "relu", "norm_eps": 1e-5}).save_pretrained(tmp_path / "m")
    with pytest.raises(DiffusersFormatError, match=r'act_fn = "relu" .*; norm_eps = 1e-05 \(supported: 1e-06\)'):
        load_diffusers_unet(tmp_path / "m")


def test_single_head_attention_may_be_spelled_out(tmp_path):
    """attention_head_dim equal to every attention level's width is one head, as sftrl's."""
    config = {**SMALL, "block_out_channels": [64, 64, 64], "attention_head_dim": 64}
    reference = diffusers_unet(config)
    reference.save_pretrained(tmp_path / "m")
    assert max_noise_diff(reference, load_diffusers_unet(tmp_path / "m"), 16, batch=2) <= 1e-5


def test_scheduler_betas_are_sftrls():
    for name in ("linear", "sigmoid"):
        settings = {k: v for k, v in scheduler_config(1000, name).items() if not k.startswith("_")}
        betas = DDPMScheduler(**settings).betas.double().numpy()
        exact = make_betas(name, 1000)
        assert (abs(betas - exact) / exact).max() < 1e-6  # float32 rounding of the same formula


def _folder(tmp_path: Path, config: dict, scheduler: dict | None = DDPM_SCHEDULER) -> Path:
    folder = tmp_path / "diffusers-unet"
    diffusers_unet(config).save_pretrained(folder)
    if scheduler is not None:
        DDPMScheduler(**scheduler).save_pretrained(folder)  # scheduler_config.json beside it, as google/ddpm-*
    return folder


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_the_folder_fills_the_unset_config(tmp_path):
    folder = _folder(tmp_path, SMALL)
    path = _yaml(tmp_path, f"data: {{name: folder, path: x}}\nmodel: {{sampler: unet, checkpoint: {folder}}}\n"
                           "diffusion: {schedule: fastdpm-var-linear, steps: 4}\n")
    cfg = load(path)
    m, d = cfg.model, cfg.diffusion
    assert (m.unet_ch, m.unet_ch_mult, m.unet_num_res_blocks, m.unet_attn_resolutions) == (32, (1, 2, 2), 1, (16, 8))
    assert cfg.data.image_size == 16 and (d.num_train_steps, d.beta_schedule) == (1000, "linear")


def test_a_disagreeing_config_names_both_values(tmp_path):
    folder = _folder(tmp_path, SMALL)
    path = _yaml(tmp_path, f"data: {{name: folder, path: x}}\nmodel: {{sampler: unet, checkpoint: {folder}}}\n"
                           "diffusion: {schedule: fastdpm-var-linear, steps: 4}\n")
    with pytest.raises(ConfigError) as err:
        load(path, ["model.unet_ch_mult=[1,2]"])
    message = str(err.value)
    assert message.startswith("override 'model.unet_ch_mult=[1,2]': 'model.unet_ch_mult' = [1, 2] disagrees")
    assert "gives [1, 2, 2]" in message and str(folder / "config.json") in message
    with pytest.raises(ConfigError, match=r"'diffusion.num_train_steps' = 10 disagrees .*scheduler_config.json gives 1000"):
        load(path, ["diffusion.num_train_steps=10"])


def test_an_unrepresentable_scheduler_is_named(tmp_path):
    folder = _folder(tmp_path, SMALL, {**DDPM_SCHEDULER, "beta_end": 0.012, "prediction_type": "v_prediction"})
    path = _yaml(tmp_path, f"data: {{name: folder, path: x}}\nmodel: {{sampler: unet, checkpoint: {folder}}}\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert "beta_end = 0.012 (supported with linear betas: 0.02)" in str(err.value)
    assert 'prediction_type = "v_prediction" (supported: "epsilon"' in str(err.value)


TINY_LAYOUT = {**SMALL, "block_out_channels": [32, 64], "sample_size": 32,
               "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}


def test_cifar10_config_runs_from_a_diffusers_folder_and_exports_one(tmp_path):
    """configs/cifar10.yaml (the tiny overrides' U-Net) from a diffusers folder, then ``sftrl export``."""
    from sftrl.checkpoint import latest_checkpoint, load_checkpoint

    data = write_cifar_batches(tmp_path / "cifar")
    folder = _folder(tmp_path, TINY_LAYOUT)
    run_dir = tmp_path / "run"
    result = run_image_config("configs/cifar10.yaml", run_dir, [f"data.path={data}", f"model.checkpoint={folder}"],
                              tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = assert_complete_image_run(run_dir, folder, "diffusers")
    assert state["iteration"] == ITERATIONS

    out = tmp_path / "exported"
    result = run_cli(["sftrl.cli", "export", str(run_dir), "--format", "diffusers", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors",
                                                     "scheduler_config.json", "sftrl_schedule.json"]
    assert not list(tmp_path.glob(".exported.*"))  # the temporary folder was renamed
    tuned = load_checkpoint(latest_checkpoint(run_dir))["learner"]["policy"]
    reloaded = UNet2DModel.from_pretrained(out)
    reloaded.save_pretrained(tmp_path / "resaved")
    back = load_diffusers_unet(tmp_path / "resaved").state_dict()
    assert set(back) == set(tuned) and all(torch.equal(back[k], tuned[k]) for k in tuned)
    assert DDPMScheduler.from_pretrained(out).config.num_train_timesteps == 1000
    schedule = json.loads((out / "sftrl_schedule.json").read_text())
    assert (schedule["schedule"], schedule["steps"], schedule["kappa"]) == ("fastdpm-var-quadratic", 10, 1.0)
    readme = (out / "README.md").read_text()
    assert "fastdpm-var-quadratic" in readme and f"{schedule['timesteps'][0]:.6g}" in readme

    again = run_cli(["sftrl.cli", "export", str(run_dir), "--format", "diffusers", "--out", str(out)])
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "already exists and is not an empty folder" in again.stderr


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    data = write_cifar_batches(tmp_path / "cifar")
    (tmp_path / "empty").mkdir()
    result = run_image_config("configs/cifar10.yaml", tmp_path / "run",
                              [f"data.path={data}", f"model.checkpoint={tmp_path / 'empty'}"], tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is a folder but not a diffusers model folder" in result.stderr


def test_tiny_overrides_describe_the_tiny_layout():
    """The e2e folder must be the U-Net the tiny overrides ask for (else the run stops at the config)."""
    assert {"model.unet_ch=32", "model.unet_ch_mult=[1,2]", "model.unet_num_res_blocks=1",
            "model.unet_attn_resolutions=[]"} <= set(TINY)

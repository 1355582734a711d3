import math

import pytest
import torch
from torch import nn

from sftrl.models.image import ImageBaseline, ImageCritic, critic_feature_sizes

SMALL = (8, 16, 32)  # small widths keep the shape tests fast


@pytest.mark.parametrize(
    "resolution, in_channels, sizes, final_kernel, out_side",
    [
        (8, 1, [8, 4, 2, 1], 1, 1),  # digits 8x8: final map 1x1, 1x1 kernel
        (16, 1, [16, 8, 4, 2], 2, 1),  # digits 16x16
        (28, 1, [28, 14, 7, 3], 3, 1),  # MNIST: a 4x4 kernel would not fit 3x3
        (32, 3, [32, 16, 8, 4], 4, 1),  # CIFAR-10: the paper's 4x4 kernel, 1x1 output
        (64, 3, [64, 32, 16, 8], 4, 5),  # CelebA: 5x5 scores, averaged
    ],
)
def test_critic_shapes(resolution, in_channels, sizes, final_kernel, out_side):
    assert critic_feature_sizes(resolution) == sizes
    critic = ImageCritic(in_channels, resolution, channels=SMALL)
    assert critic.final_kernel == final_kernel
    x = torch.randn(5, in_channels, resolution, resolution)
    h = x
    for conv in critic.down:
        h = conv(h)
    assert h.shape[-1] == sizes[-1]
    assert critic.out(h).shape == (5, 1, out_side, out_side)
    y = critic(x)
    assert y.shape == (5,)
    assert y.dtype == torch.float32
    # the output is the spatial mean of the final map
    h = x
    for conv in critic.down:
        h = nn.functional.leaky_relu(conv(h), 0.2)
    torch.testing.assert_close(y, critic.out(h).flatten(1).mean(1))


def test_critic_per_sample_independent():
    critic = ImageCritic(3, 32, channels=SMALL)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(critic(x)[1:2], critic(x[1:2]))


def test_critic_parameter_count_paper_cifar():
    critic = ImageCritic(3, 32)  # paper default: 256, 512, 1024
    expected = (
        (3 * 256 * 4 * 4 + 256)  # conv 1: 3 -> 256, 4x4
        + (256 * 512 * 4 * 4 + 512)  # conv 2: 256 -> 512
        + (512 * 1024 * 4 * 4 + 1024)  # conv 3: 512 -> 1024
        + (1024 * 1 * 4 * 4 + 1)  # final 4x4 conv to one channel
    )
    assert expected == 10_516_225
    assert sum(p.numel() for p in critic.parameters()) == expected


def test_critic_leaky_relu_slope():
    critic = ImageCritic(1, 8, channels=(1, 1, 1))
    with torch.no_grad():
        for conv in critic.down:
            conv.weight.zero_()
            conv.bias.fill_(-1.0)  # negative pre-activation everywhere
        critic.out.weight.fill_(1.0)
        critic.out.bias.zero_()
    # conv3 sees zeros weights, so its output is LeakyReLU(-1) = -0.2; final 1x1 conv: weight 1
    assert critic(torch.randn(2, 1, 8, 8)).tolist() == pytest.approx([-0.2, -0.2])


def test_critic_errors():
    with pytest.raises(ValueError, match="too small"):
        ImageCritic(1, 7, channels=SMALL)
    with pytest.raises(ValueError, match="three positive widths"):
        ImageCritic(1, 8, channels=(8, 16))
    critic = ImageCritic(1, 8, channels=SMALL)
    with pytest.raises(ValueError, match="expects"):
        critic(torch.randn(2, 3, 8, 8))


def test_baseline_shapes_and_step_dependence():
    torch.manual_seed(0)
    baseline = ImageBaseline((3, 8, 8), num_steps=10, hidden=(32, 32, 16))
    x = torch.randn(6, 3, 8, 8)
    n = torch.arange(1, 7)
    v = baseline(x, n)
    assert v.shape == (6,)
    same_x = x[:1].expand(6, -1, -1, -1)
    values = baseline(same_x, n)
    assert values.unique().numel() == 6  # the value depends on n
    torch.testing.assert_close(baseline(x, n.float()), v)  # float steps are rounded
    assert baseline(x, torch.full((6,), 10)).shape == (6,)  # n = S is valid
    with pytest.raises(IndexError):
        baseline(x, torch.full((6,), 11))
    with pytest.raises(ValueError, match="expects"):
        baseline(torch.randn(6, 1, 8, 8), n)
    with pytest.raises(ValueError, match="n must have shape"):
        baseline(x, n[:3])


def test_baseline_paper_structure():
    baseline = ImageBaseline((3, 32, 32), num_steps=10)
    linears = [layer.linear for layer in baseline.layers] + [baseline.out]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (3072, 1024),
        (1024, 1024),
        (1024, 256),
        (256, 1),
    ]
    for layer in baseline.layers:
        emb = layer.embedding.weight
        assert emb.shape[0] == 11  # steps 0..S
        assert float(emb.detach().min()) >= 0.0 and float(emb.detach().max()) < 1.0


def test_baseline_gradient_reaches_step_embedding():
    baseline = ImageBaseline((1, 8, 8), num_steps=4, hidden=(8, 8, 4))
    v = baseline(torch.randn(3, 1, 8, 8), torch.tensor([1, 1, 3]))
    v.sum().backward()
    grad = baseline.layers[0].embedding.weight.grad
    assert grad[[1, 3]].abs().sum() > 0
    assert grad[[0, 2, 4]].abs().sum() == 0  # only the used steps' rows get gradient


def test_the_authors_init_draws_kaiming_convs_and_xavier_linears_and_a_larger_critic():
    torch.manual_seed(0)
    critic = ImageCritic(3, 32, channels=(128, 256, 512))  # init="authors", the default
    for conv in [*critic.down, critic.out]:
        fan_in = conv.weight[0].numel()
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.1)  # Kaiming-normal
    baseline = ImageBaseline((3, 32, 32), num_steps=10)
    for linear in [*(layer.linear for layer in baseline.layers), baseline.out]:
        fan_out, fan_in = linear.weight.shape
        assert linear.weight.std().item() == pytest.approx(math.sqrt(2.0 / (fan_in + fan_out)), rel=0.15)  # Xavier
    torch.manual_seed(0)
    default = ImageCritic(3, 32, channels=(128, 256, 512), init="torch")
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ratio = critic(x).abs().mean() / default(x).abs().mean()
    assert ratio > 10  # DESIGN: PyTorch's defaults give a ~33x smaller initial critic
    with pytest.raises(ValueError, match="init must be one of"):
        ImageCritic(3, 32, init="xavier")


def test_model_image_init_reaches_the_built_networks():
    from sftrl.config import load
    from sftrl.models import build_networks

    def critic_std(init):
        cfg = load(None, ["data.name=digits", "model.sampler=unet", "model.unet_ch=32", "model.unet_ch_mult=[1]",
                          "model.unet_num_res_blocks=1", "model.unet_attn_resolutions=[]",
                          "model.critic_channels=[4,8,16]", f"model.image_init={init}"])
        torch.manual_seed(0)
        _, critic, _ = build_networks(cfg, (1, 8, 8))
        return critic.down[2].weight.std().item()

    assert critic_std("authors") == pytest.approx(math.sqrt(2.0 / (8 * 16)), rel=0.15)
    assert critic_std("torch") < 0.5 * critic_std("authors")

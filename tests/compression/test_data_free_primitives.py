"""BN folding, producer/consumer pair discovery and the UDFC closed forms against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from torch import nn

from compression.methods.data_free import (
    one_to_one_scales,
    select_pruned_channels,
    udfc_pruning_scales,
    udfc_quant_scales,
)
from compression.primitives.bn_fold import bn_gain_shift, fold_bn, folded_preactivation_prior, gaussian_relu_mean
from compression.primitives.channel_graph import find_channel_graph
from compression.zoo.fmnist_resnet import build_fmnist_resnet


def _random_bn(channels: int, seed: int) -> nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels).eval()
    bn.weight.data = torch.rand(channels, generator=generator) + 0.5
    bn.bias.data = torch.randn(channels, generator=generator)
    bn.running_mean = torch.randn(channels, generator=generator)
    bn.running_var = torch.rand(channels, generator=generator) + 0.3
    return bn


def test_fold_bn_matches_conv_then_bn() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    bn = _random_bn(6, seed=1)
    weight, bias = fold_bn(conv.weight, conv.bias, bn)
    x = torch.randn(2, 3, 5, 5)
    expected = bn(conv(x)).double()
    folded = nn.functional.conv2d(x.double(), weight, bias, padding=1)
    assert torch.allclose(folded, expected, atol=1e-5)


def test_gaussian_relu_mean_matches_monte_carlo() -> None:
    mean, std = torch.tensor([-1.0, 0.0, 0.7, 2.0, 0.3]), torch.tensor([0.5, 1.0, 2.0, 0.1, 0.0])
    samples = mean + std * torch.randn(400_000, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gaussian_relu_mean(mean.double(), std.double()).float(), samples.relu().mean(0), atol=0.01)


def test_folded_prior_is_centred_and_its_layer_mean_spread_capped_at_one() -> None:
    weight = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    weight = weight / weight.flatten(1).norm(dim=1).mean()  # mean filter norm exactly 1
    for scale, mean_std in ((0.25, 0.25), (1.0, 1.0), (4.0, 1.0)):
        mean, std = folded_preactivation_prior(scale * weight)
        assert torch.equal(mean, torch.zeros(6, dtype=torch.float64))
        assert float(std.mean()) == pytest.approx(mean_std)
        assert torch.allclose(std / std.mean(), weight.double().flatten(1).norm(dim=1))  # channels keep their ratios


def _paper_form_lstsq(weight, bn, pruned_j, kept, alpha1):
    """Paper Eq. 12 literally: ‖W_j − Σ ŝ_i (γ_iσ_j)/(σ_iγ_j) W_i‖² + α1 (K_j − Σ ŝ_i K_i)², by lstsq."""
    gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
    sigma = torch.sqrt(bn.running_var.double() + bn.eps)
    k = beta - gamma * bn.running_mean.double() / sigma
    rows = weight.detach().double().flatten(1)
    q = (gamma[kept] * sigma[pruned_j] / (sigma[kept] * gamma[pruned_j]))[:, None] * rows[kept]
    design = np.vstack([q.T.numpy(), np.sqrt(alpha1) * k[kept].numpy()[None]])
    target = np.concatenate([rows[pruned_j].numpy(), [np.sqrt(alpha1) * float(k[pruned_j])]])
    return np.linalg.lstsq(design, target, rcond=None)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_udfc_pruning_scales_match_paper_form_brute_force(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(12, 4, 3, 3, generator=generator)  # D = 36 > 8 kept: well-posed, as in the paper
    bn = _random_bn(12, seed)
    gain, shift = bn_gain_shift(bn)
    pruned, kept = select_pruned_channels(weight, 1 / 3, "l2")
    folded = weight.double().flatten(1) * gain[:, None]
    ours = udfc_pruning_scales(folded, shift, gain, pruned, kept, alpha1=0.3, ridge=0.0)
    for row, j in enumerate(pruned):
        expected = _paper_form_lstsq(weight, bn, j, kept, alpha1=0.3)
        np.testing.assert_allclose(ours[row].numpy(), expected, rtol=1e-6, atol=1e-8)


def test_udfc_pruning_scales_with_ridge_and_nonnegativity_match_stacked_solvers() -> None:
    generator = torch.Generator().manual_seed(3)
    folded, bias = torch.randn(10, 6, generator=generator).double(), torch.randn(10, generator=generator).double()
    gain = torch.rand(10, generator=generator).double() + 0.5
    pruned, kept = torch.tensor([1, 4, 7]), torch.tensor([0, 2, 3, 5, 6, 8, 9])  # 7 kept > D = 6: singular
    kept_rows = folded[kept]
    rho = 0.01 * float((kept_rows @ kept_rows.T).diagonal().mean())
    for nonnegative in (False, True):
        ours = udfc_pruning_scales(folded, bias, gain, pruned, kept, 0.5, ridge=0.01, nonnegative=nonnegative)
        for row, j in enumerate(pruned):
            lam = np.sqrt(0.5) * float(gain[j])
            design = np.vstack([kept_rows.T.numpy(), lam * bias[kept].numpy()[None], np.sqrt(rho) * np.eye(7)])
            target = np.concatenate([folded[j].numpy(), [lam * float(bias[j])], np.zeros(7)])
            solver = nnls(design, target)[0] if nonnegative else np.linalg.lstsq(design, target, rcond=None)[0]
            np.testing.assert_allclose(ours[row].numpy(), solver, rtol=1e-5, atol=1e-7)
        assert (ours >= 0).all() or not nonnegative


def test_corrected_eq21_matches_scalar_least_squares_and_printed_form_is_one() -> None:
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(5, 20, generator=generator).double()
    weight_q = weight + 0.05 * torch.randn(5, 20, generator=generator).double()
    gain, shift = torch.rand(5, generator=generator).double() + 0.5, torch.randn(5, generator=generator).double()
    ours = udfc_quant_scales(weight, weight_q, gain, shift, alpha2=0.2)
    for m in range(5):
        r, r_q = gain[m] * weight[m], gain[m] * weight_q[m]
        design = np.concatenate([r_q.numpy(), [np.sqrt(0.2) * float(shift[m])]])[:, None]
        target = np.concatenate([r.numpy(), [np.sqrt(0.2) * float(shift[m])]])
        assert ours[m].item() == pytest.approx(np.linalg.lstsq(design, target, rcond=None)[0][0], rel=1e-10)
        printed = (r @ r + 0.2 * shift[m] ** 2) / (r @ r + 0.2 * shift[m] ** 2)
        assert printed.item() == pytest.approx(1.0)
    assert not torch.allclose(ours, torch.ones(5, dtype=torch.float64))
    exact = udfc_quant_scales(weight, weight / 1.25, gain, torch.zeros(5).double(), alpha2=0.008)
    assert torch.allclose(exact, torch.full((5,), 1.25, dtype=torch.float64))


def test_select_pruned_channels_criteria() -> None:
    weight = torch.zeros(4, 3)
    weight[0] = torch.tensor([3.0, 0.0, 0.0])  # l1 3, l2 3
    weight[1] = torch.tensor([1.1, 1.1, 1.1])  # l1 3.3, l2 1.9
    weight[2] = torch.tensor([5.0, 5.0, 5.0])
    weight[3] = torch.tensor([0.1, 0.0, 0.0])
    assert select_pruned_channels(weight, 0.5, "l1")[0].tolist() == [0, 3]
    assert select_pruned_channels(weight, 0.5, "l2")[0].tolist() == [1, 3]
    assert len(select_pruned_channels(weight, 0.99, "l1")[1]) == 1  # never removes every channel


def test_one_to_one_picks_the_most_similar_kept_filter() -> None:
    folded = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [-1.0, 0.0]]).double()
    scales = one_to_one_scales(folded, torch.tensor([2, 3]), torch.tensor([0, 1]))
    assert scales.tolist() == [[0.0, 2.0], [0.0, 0.0]]  # channel 3 is anti-parallel to all: not merged


def test_channel_graph_on_the_fixture_resnet() -> None:
    graph = find_channel_graph(build_fmnist_resnet())
    assert sorted(graph.pairs) == ["layer1.conv1", "layer2.conv1", "layer3.conv1"]
    pair = graph.pairs["layer2.conv1"]
    assert (pair.bn, pair.activation, [c.name for c in pair.consumers]) == ("layer2.bn1", "relu", ["layer2.conv2"])
    assert graph.unpaired["layer2.conv2"].startswith("feeds a residual add")
    assert graph.unpaired["stem.0"].startswith("feeds a residual add")
    assert "leaves the traced scope" in graph.unpaired["fc"]
    assert graph.layers.index("layer1.conv1") < graph.layers.index("layer1.conv2")


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.left = nn.Conv2d(8, 4, 1)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)
        self.gelu_in = nn.Linear(4, 6)
        self.gelu_out = nn.Linear(6, 2)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        y = self.depthwise(self.left(h))
        feature = torch.flatten(nn.functional.max_pool2d(y, 1), 1)
        return self.head(feature) + self.gelu_out(nn.functional.gelu(self.gelu_in(y.mean((2, 3))))).sum()


def test_channel_graph_paths_blocks_and_reasons() -> None:
    graph = find_channel_graph(_Branchy())
    assert graph.pairs["conv"].consumers[0].name == "left"
    assert "grouped/depthwise" in graph.unpaired["left"]
    depthwise = graph.pairs.get("depthwise") or graph.unpaired["depthwise"]
    assert "grouped/depthwise" in str(depthwise)
    assert graph.pairs["gelu_in"].activation == "gelu"


class _FlattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1))


def test_flatten_consumer_block_and_max_pool_flag() -> None:
    consumer = find_channel_graph(_FlattenHead()).pairs["conv"].consumers[0]
    assert (consumer.name, consumer.block, consumer.mean_preserving) == ("head", 4, False)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace the parent
            return self.body(x)
        return self.body(-x)


def test_untraceable_parent_falls_back_to_children() -> None:
    graph = find_channel_graph(_Untraceable())
    assert graph.pairs["body.0"].consumers[0].name == "body.3"
    assert "leaves the traced scope" in graph.unpaired["body.3"]

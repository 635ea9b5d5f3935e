"""data_free (UDFC): exact reconstruction cases, physical shrinking, quality vs plain pruning, contracts."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError
from sklearn.datasets import load_digits
from torch import nn

from compression.configs import DataFreeConfig
from compression.methods.data_free import compress
from compression.registry import get_method
from compression.types import Batches
from compression.zoo.fmnist_resnet import (
    build_fmnist_resnet,
    load_fashion_mnist,
    load_pretrained,
)


def _relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return ((approx - reference).norm() / reference.norm()).item()


def _set_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, gamma, beta, mean, var) -> None:
    bn.weight.data, bn.bias.data = torch.as_tensor(gamma).float(), torch.as_tensor(beta).float()
    bn.running_mean, bn.running_var = torch.as_tensor(mean).float(), torch.as_tensor(var).float()


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            n = module.num_features
            _set_bn(module, torch.rand(n, generator=generator) + 0.5, 0.3 * torch.randn(n, generator=generator),
                    0.2 * torch.randn(n, generator=generator), torch.rand(n, generator=generator) + 0.5)  # fmt: skip
    return model.eval()


class _ConvBlock(nn.Module):
    """conv -> BN -> act -> consumer (a conv, or flatten + Linear)."""

    def __init__(self, act: nn.Module, flatten_head: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.act = act
        self.flatten_head = flatten_head
        self.consumer = nn.Linear(6 * 4 * 4, 5) if flatten_head else nn.Conv2d(6, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x)))
        return self.consumer(torch.flatten(h, 1) if self.flatten_head else h)


def _block_with_dependent_channel(act: nn.Module, flatten_head: bool) -> _ConvBlock:
    """Channel 5 is rebuilt exactly by the kept channels: in BN-folded space h_5 = Σ s_i h_i.

    With identity activation (the paper's "BN only" case, Eq. 7) any combination passes exactly; with
    ReLU only a positive multiple of one channel does (relu(c·h) = c·relu(h)), so that case uses one.
    The BN statistics are consistent with zero-mean inputs, as the bias-correction step assumes.
    """
    torch.manual_seed(0)
    block = _ConvBlock(act, flatten_head).eval()
    weight, gamma, beta = torch.randn(6, 3, 3, 3), torch.rand(6) + 0.5, torch.randn(6)
    mean, var, eps = torch.zeros(6), torch.rand(6) + 0.5, block.bn.eps
    if isinstance(act, nn.Identity):
        coefficients = torch.tensor([0.08, -0.05, 0.06, 0.0, 0.0])
        gain = gamma / torch.sqrt(var + eps)
        weight[5] = (coefficients @ (weight.flatten(1) * gain[:, None])[:5]).reshape(3, 3, 3) / gain[5]
        beta[5] = coefficients @ beta[:5]
    else:  # z_5 = 0.5·z_2 and σ_5 = 0.5·σ_2, then γ_5 = 0.3·γ_2, β_5 = 0.3·β_2: h_5 = 0.3·h_2
        weight[5], var[5] = 0.5 * weight[2], 0.25 * (var[2] + eps) - eps
        gamma[5], beta[5] = 0.3 * gamma[2], 0.3 * beta[2]
    block.conv.weight.data = weight
    _set_bn(block.bn, gamma, beta, mean, var)
    return block


@pytest.mark.parametrize("act", [nn.Identity(), nn.ReLU()], ids=["bn_only", "relu"])
@pytest.mark.parametrize("flatten_head", [False, True], ids=["conv_consumer", "flatten_linear_consumer"])
def test_reconstruction_is_exact_for_a_dependent_channel(act: nn.Module, flatten_head: bool) -> None:
    block = _block_with_dependent_channel(act, flatten_head)
    x = torch.randn(16, 3, 6, 6)
    config = DataFreeConfig(prune_ratio=1 / 6, bits=None, criterion="l1", ridge=0.0)
    result = compress(block, None, config)
    assert result.stats["channels_pruned"] == {"conv": {"pruned": 1, "total": 6}}
    assert result.model.conv.out_channels == 5 and result.model.bn.num_features == 5
    with torch.no_grad():
        assert torch.allclose(result.model(x), block(x), atol=1e-4)
        plain = compress(block, None, config.model_copy(update={"compensation": "none"})).model(x)
    assert _relative_error(block(x).detach(), plain) > 1e-2  # the channel mattered


def _train_digits_cnn() -> tuple[nn.Module, torch.Tensor]:
    digits = load_digits()
    images = (torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 - 0.3) / 0.4
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    order = torch.randperm(1400, generator=torch.Generator().manual_seed(0))
    for _ in range(8):
        for start in range(0, 1400, 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), images[1400:]


@pytest.fixture(scope="module")
def digits_cnn() -> tuple[nn.Module, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add contention on a shared CI machine
    try:
        with torch.random.fork_rng():
            return _train_digits_cnn()
    finally:
        torch.set_num_threads(threads)


def test_udfc_beats_plain_pruning_on_a_trained_cnn(digits_cnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, images = digits_cnn
    errors = {}
    with torch.no_grad():
        reference = model(images)
        for compensation in ("udfc", "none", "one_to_one"):
            config = DataFreeConfig(prune_ratio=0.3, bits=None, compensation=compensation)
            errors[compensation] = _relative_error(reference, compress(model, None, config).model(images))
    assert errors["udfc"] < 0.75 * errors["none"], errors
    assert errors["one_to_one"] < errors["none"], errors


def test_quantized_export_round_trips_and_4bit_error_is_bounded(digits_cnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, images = digits_cnn
    result = compress(model, None, DataFreeConfig(prune_ratio=0.0, bits=4))
    layers = dict(result.model.named_modules())
    assert set(result.quantized) == {"0", "3", "6", "11"}
    for name, entry in result.quantized.items():
        assert entry.codes.dtype == torch.int8 and int(entry.codes.min()) >= -8 and int(entry.codes.max()) <= 7
        assert torch.count_nonzero(entry.zeros) == 0 and entry.scales.shape == (entry.codes.shape[0], 1)
        assert torch.equal(entry.dequantize(), layers[name].weight.detach())
    with torch.no_grad():
        assert _relative_error(model(images), result.model(images)) < 0.5
        six_bit = compress(model, None, DataFreeConfig(prune_ratio=0.0, bits=6)).model(images)
        assert _relative_error(model(images), six_bit) < 0.15
    assert len(result.stats["quant_scale_compensation"]) == 3  # the three conv -> BN -> ReLU -> consumer pairs
    assert "corrected Eq. 21" in " ".join(result.notes)


def test_residual_network_shrinks_consistently() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(build_fmnist_resnet(), seed=0)
    result = compress(model, None, DataFreeConfig(prune_ratio=0.5, bits=6))
    pruned = result.model
    assert [pruned.layer1.conv1.out_channels, pruned.layer2.conv1.out_channels, pruned.layer3.conv1.out_channels] == [
        8, 16, 32,
    ]  # fmt: skip
    assert pruned.layer3.bn1.num_features == 32 and pruned.layer3.conv2.weight.shape == (64, 32, 3, 3)
    assert pruned.layer3.conv2.out_channels == 64  # residual stream kept whole
    assert result.stats["params_after"] < result.stats["params_before"]
    assert sum(p.numel() for p in pruned.parameters()) == result.stats["params_after"]
    assert result.stats["not_pruned"]["layer2.conv2"].startswith("feeds a residual add")
    assert any("residual adds" in note for note in result.notes)
    for name, entry in result.quantized.items():
        assert entry.orig_shape == tuple(pruned.get_submodule(name).weight.shape)
    with torch.no_grad():
        out = pruned(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("ridge", [0.0, 1e-4])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_1x1_convs_with_more_kept_channels_than_filter_dims_stay_finite(ridge: float, nonnegative: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )  # fmt: skip
    model = _randomize_bn(model, seed=1)
    config = DataFreeConfig(prune_ratio=0.3, bits=4, ridge=ridge, nonnegative=nonnegative)
    result = compress(model, None, config)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert result.model[0].out_channels == 45 and result.model[3].in_channels == 45
    with torch.no_grad():
        assert torch.isfinite(result.model(torch.randn(2, 3, 4, 4))).all()


def test_deterministic_and_input_not_mutated() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(build_fmnist_resnet(), seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = DataFreeConfig(prune_ratio=0.3, bits=4, seed=3)
    first, second = compress(model, None, config), compress(model, None, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.layer1.conv1.out_channels == 16
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    assert first.model is not model


def test_linear_only_model_gets_quantization_path_and_notes() -> None:
    torch.manual_seed(0)

    class _Ffn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down, self.norm = nn.Linear(16, 32), nn.Linear(32, 16), nn.LayerNorm(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x + self.down(nn.functional.gelu(self.up(x))))

    model = _Ffn().eval()
    result = compress(model, None, DataFreeConfig(prune_ratio=0.3, bits=8))
    assert set(result.quantized) == {"up", "down"} and not result.stats["channels_pruned"]
    assert "gelu" in result.stats["not_pruned"]["up"]
    assert any(note.startswith("Linear-only model") for note in result.notes)
    assert any(note.startswith("No channel was pruned") for note in result.notes)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert _relative_error(model(x), result.model(x)) < 0.02


def test_mlp_with_batchnorm1d_is_pruned_and_skip_layers_respected() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 3)
    )
    model = _randomize_bn(model, seed=3)
    result = compress(model, None, DataFreeConfig(prune_ratio=0.25, bits=6, skip_layers=["5"]))
    assert (result.model[0].out_features, result.model[1].num_features, result.model[3].in_features) == (15, 15, 15)
    assert result.model[3].out_features == 12  # its consumer "5" is skipped, so its channels stay
    assert result.skipped == {"5": "matched skip_layers"} and "5" not in result.quantized
    assert "skip_layers" in result.stats["not_pruned"]["3"]
    assert torch.equal(result.model[5].weight, model[5].weight)


def test_depthwise_conv_is_skipped_with_reason() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))
    result = compress(_randomize_bn(model, seed=4), None, DataFreeConfig(prune_ratio=0.5, bits=4))
    assert "depthwise" in result.skipped["3"]
    assert result.model[0].out_channels == 8  # its consumer is depthwise: channels cannot be merged


def test_registry_progress_and_config_defaults() -> None:
    config = DataFreeConfig()
    assert (config.alpha1, config.alpha2, config.compensation) == (0.01, 0.008, "udfc")
    with pytest.raises(ValidationError):
        DataFreeConfig(layer_ratios={"conv*": 1.0})
    calls: list[tuple[float, str]] = []
    model = _randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)), 5)
    result = get_method("data_free")(model, None, config, progress=lambda f, m: calls.append((f, m)))
    assert result.method == "data_free" and calls[-1][0] == 1.0
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))
    assert result.stats["time_s"] >= 0 and any("Eq. 20" in note for note in result.notes)


def test_onnx_interpreter_module_gets_the_same_pairs_and_result(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    from compression.io.onnx_torch import OnnxModule

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    model = _randomize_bn(model, seed=6)
    x = torch.randn(4, 1, 10, 10)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"], dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)  # fmt: skip
    interpreted = OnnxModule(onnx.load(str(path))).eval()
    config = DataFreeConfig(prune_ratio=0.5, bits=4)
    ours, theirs = compress(model, None, config), compress(interpreted, None, config)
    assert theirs.stats["channels_pruned"] == ours.stats["channels_pruned"] == {
        "0": {"pruned": 4, "total": 8}, "3": {"pruned": 4, "total": 8},
    }  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(theirs.model(input=x), ours.model(x), atol=1e-5)


def _folded_onnx(model: nn.Module, example: torch.Tensor, path) -> nn.Module:
    """`model` as an ONNX upload reaches the methods: exported in eval mode (BatchNorm folded into the convs)
    and loaded by the service's loader."""
    from compression.io.model import load_model

    torch.onnx.export(model, (example,), str(path / "model.onnx"), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)  # fmt: skip
    module = load_model(path / "model.onnx", work_dir=path).module
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    return module


def test_folded_bn_onnx_resnet_beats_plain_pruning_and_says_what_it_assumed(tmp_path) -> None:
    images, labels = load_fashion_mnist("test", limit=400)
    module = _folded_onnx(load_pretrained(), images[:2], tmp_path)
    top1 = {}
    for name, update in {"plain": {"compensation": "none"}, "default": {}}.items():
        result = compress(module, None, DataFreeConfig(prune_ratio=0.3, bits=6, criterion="l2", **update))
        with torch.no_grad():
            top1[name] = (result.model(input=images).argmax(1) == labels).float().mean().item()
    assert top1["default"] > top1["plain"] + 0.2, top1  # 0.72 vs 0.23 on 2,000 images (today: 0.21)
    assert len(result.stats["bias_correction_prior"]) == 3
    assert any("data-free prior" in note for note in result.notes)
    assert any(note.startswith("Not checked against plain pruning") for note in result.notes)


def test_calibration_data_checks_the_compensation_against_plain_pruning(
    digits_cnn: tuple[nn.Module, torch.Tensor], tmp_path
) -> None:
    model, images = digits_cnn
    module = _folded_onnx(model, images[:2], tmp_path)
    calib = Batches([{"input": images[i : i + 64]} for i in range(0, 256, 64)])
    printed = DataFreeConfig(prune_ratio=0.3, bits=6, bias_correction=False)  # worse than plain when BN is folded
    checked = compress(module, calib, printed)
    assert checked.stats["check_against_plain"]["shipped"] == "plain"
    errors = checked.stats["check_against_plain"]["relative_output_error"]
    assert errors["plain"] < errors["compensated"]
    assert "Compensation none: plain pruning" in " ".join(checked.notes) and "PLAIN PRUNING" in checked.notes[-1]
    unchecked = compress(module, None, printed)
    with torch.no_grad():
        reference = module(input=images)
        assert _relative_error(reference, checked.model(input=images)) < _relative_error(
            reference, unchecked.model(input=images)
        )
    default = compress(module, calib, DataFreeConfig(prune_ratio=0.3, bits=6))
    assert default.stats["check_against_plain"]["shipped"] == "compensated"

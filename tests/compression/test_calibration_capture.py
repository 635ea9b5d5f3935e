"""The one calibration pass (`compression.primitives.capture`): mixed precision runs the float model once
per calibration sample, and what its consumers read from the pass equals what their own passes gave."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compression.configs import GPTQConfig, MixedPrecisionConfig
from compression.methods import quant_gptq
from compression.methods.mixed_precision import compress as mixed_precision
from compression.methods.mixed_precision_candidates import matrix_quantizer
from compression.primitives.capture import ChannelStats, Hessians, calibrate
from compression.primitives.hessian import HessianAccumulator
from compression.primitives.importance import ActivationImportance
from compression.primitives.sensitivity import SensitivityCache
from compression.primitives.sequential import capture_blocks, quantize_sequentially
from compression.primitives.weight_quant import quantize_module
from compression.types import Batches

FLOAT_ROWS: list[int] = []
"""Rows of every forward of a `_Counted` model whose blocks and weights are all still the float ones."""


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.gate = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + torch.tanh(self.fc(hidden)) * torch.sigmoid(self.gate(hidden))


class _Counted(nn.Module):
    """stem -> 3 chained blocks -> head; counts its float forwards in FLOAT_ROWS."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(8, 16), nn.Linear(16, 5)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.float_weights = {name: p.detach().clone() for name, p in self.named_parameters()}

    def is_float(self) -> bool:
        if not all(type(block) is _Block for block in self.blocks):
            return False  # a sensitivity replay stub stands in for a block
        return all(torch.equal(p, self.float_weights[name]) for name, p in self.named_parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_float():
            FLOAT_ROWS.append(x.shape[0])
        hidden = self.stem(x)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model_and_data() -> tuple[_Counted, Batches]:
    torch.manual_seed(0)
    return _Counted().eval(), Batches([{"x": torch.randn(6, 8)} for _ in range(4)])


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_mixed_precision_runs_the_float_model_once_per_calibration_sample(quantizer: str) -> None:
    """MACs, ties, Hessians, sensitivity reference and replay, the Pareto points' reference and each budget's
    block-by-block start all come from one pass (it used to take 5 passes plus one per budget)."""
    model, calib = _model_and_data()
    config = MixedPrecisionConfig(
        quantizer=quantizer, candidates=[2, 4], group_size=8, budget_bits=3.0, budgets=[2.5], sensitivity_samples=10
    )
    FLOAT_ROWS.clear()
    result = mixed_precision(model, calib, config, cache=SensitivityCache())
    assert sum(FLOAT_ROWS) == 24 and len(FLOAT_ROWS) == 5  # 24 samples once; the batch of 6 cut at sample 14
    assert result.stats["sensitivity"]["held_out"] == (quantizer == "gptq")
    assert len(result.stats["pareto"]) == 2 and result.stats["pareto"][0]["measured"]["sqnr_db"] > 0


def test_gptq_runs_the_float_model_once_per_calibration_sample() -> None:
    model, calib = _model_and_data()
    FLOAT_ROWS.clear()
    result = quant_gptq.compress(model, calib, GPTQConfig(bits=3, group_size=None))
    assert result.stats["calibration"] == "3 blocks under 'blocks'"
    assert FLOAT_ROWS == [6, 6, 6, 6]


def test_quantizing_from_a_shared_capture_equals_capturing_anew() -> None:
    """Mixed precision hands each budget the blocks' inputs of its one pass: the codes are those of a run
    that captures its own, and the shared capture is left intact for the next budget."""
    model, calib = _model_and_data()
    config = SimpleNamespace(quantizer="gptq", group_size=8, zero_point="float")

    def run(captured: object) -> dict[str, torch.Tensor]:
        work = _Counted()
        work.load_state_dict(model.state_dict())
        layers = {n: m for n, m in work.named_modules() if isinstance(m, nn.Linear) and n != "head"}

        def quantize(name: str, module: nn.Module, hessian: torch.Tensor) -> object:
            settings = SimpleNamespace(bits=3, group_size=8)
            return quantize_module(name, module, matrix_quantizer(config, 3), hessian, settings)  # type: ignore[arg-type]

        done, how = quantize_sequentially(work, calib, layers, quantize, captured=captured)  # type: ignore[arg-type]
        assert how == "3 blocks under 'blocks'"
        return {name: layer.codes for name, layer in done.items()}

    shared = capture_blocks(model, list(calib))
    assert shared.inputs is not None
    first_hidden = shared.inputs[0].args[0][0].clone()
    fresh, reused, again = run(None), run(shared), run(shared)
    assert fresh.keys() == reused.keys() == again.keys() and len(fresh) == 7
    assert all(torch.equal(fresh[n], reused[n]) and torch.equal(fresh[n], again[n]) for n in fresh)
    assert torch.equal(shared.inputs[0].args[0][0], first_hidden)


def test_recorded_hessians_and_channel_stats_match_hand_computed_ones() -> None:
    model, calib = _model_and_data()
    layers = {"blocks.1.fc": model.blocks[1].fc, "stem": model.stem}
    hessians, stats = Hessians(layers, batches=range(2)), ChannelStats()
    calibrate(model, list(calib), [hessians, stats])
    with torch.no_grad():
        stem_in = torch.cat([batch["x"] for batch in calib.inputs[:2]]).double()
        fc_in = model.blocks[0](model.stem(torch.cat([b["x"] for b in calib.inputs]))).double()
    torch.testing.assert_close(hessians.hessian("stem")[0], stem_in.T @ stem_in / 12)
    fc_head = fc_in[:12]
    torch.testing.assert_close(hessians.hessian("blocks.1.fc")[0], fc_head.T @ fc_head / 12)
    mean_square, _ = stats.stats()[model.blocks[1].fc]
    torch.testing.assert_close(mean_square, fc_in.pow(2).mean(0))
    importance = ActivationImportance(max_batches=4)
    importance.prepare(model, calib)
    torch.testing.assert_close(importance.stats[model.blocks[1].fc][0], mean_square)


def test_hessians_skip_padding_tokens_like_the_accumulator() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    batch = {"hidden": torch.randn(2, 5, 4), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.layer(hidden)

    recorder = Hessians({"layer": layer})
    calibrate(Wrapper(), [batch], [recorder])
    direct = HessianAccumulator("layer")
    direct.add(layer, batch["hidden"], batch["attention_mask"])
    assert torch.equal(recorder.hessian("layer"), direct.hessian())

"""prune_unstructured: exact magnitude masks, N:M patterns along the input channels, honest size report."""

from __future__ import annotations

import torch
from torch import nn

from compression.configs import PruneUnstructuredConfig
from compression.methods.prune_unstructured import compress, magnitude_mask, n_m_mask, sparse_sizes


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 1, groups=2), nn.Flatten(), nn.Linear(16 * 36, 10)
    ).eval()


def test_magnitude_mask_zeroes_exactly_the_smallest() -> None:
    matrix = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    keep = magnitude_mask(matrix, 0.7)
    assert int((~keep).sum()) == round(0.7 * matrix.numel())
    assert matrix.abs()[~keep].max() <= matrix.abs()[keep].min()


def test_n_m_mask_keeps_the_largest_in_every_group() -> None:
    matrix = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    keep = n_m_mask(matrix, 2, 4)
    groups, kept = matrix.abs().view(8, 4, 4), keep.view(8, 4, 4)
    assert (kept.sum(-1) == 2).all()
    assert (groups.masked_fill(~kept, float("inf")).amin(-1) >= groups.masked_fill(kept, -1).amax(-1)).all()


def test_unstructured_sparsity_size_and_notes() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(model, None, PruneUnstructuredConfig(sparsity=0.75, skip_layers=["4"]))
    stats = result.stats
    assert abs(stats["layers"]["0"]["sparsity"] - 0.75) < 1e-3 and abs(stats["layers"]["2"]["sparsity"] - 0.75) < 1e-3
    assert result.skipped == {"4": "skip_layers"} and torch.equal(result.model[4].weight, model[4].weight)
    assert float((result.model[0].weight == 0).float().mean()) >= 0.75
    assert stats["size_sparse_bytes"] < stats["size_dense_bytes"]
    assert any("no CPU speedup" in note for note in result.notes)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())  # input untouched
    again = compress(model, None, PruneUnstructuredConfig(sparsity=0.75, skip_layers=["4"]))
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in result.model.state_dict().items())


def test_two_four_runs_along_input_channels_and_skips_what_cannot() -> None:
    model = _model()
    result = compress(model, None, PruneUnstructuredConfig(pattern="2:4"))
    weight = result.model[0].weight  # [16, 8, 3, 3]: groups of 4 input channels at each kernel position
    groups = (weight.permute(0, 2, 3, 1).reshape(16, 3, 3, 2, 4) != 0).sum(-1)
    assert (groups <= 2).all()
    assert "grouped convolution" in result.skipped["2"]
    assert result.stats["layers"]["0"]["encoding"] in ("2:4", "bitmask", "csr")
    assert result.stats["sparsity_target"] == 0.5
    out = result.model(torch.randn(2, 8, 8, 8))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_sparse_sizes_count_values_and_metadata() -> None:
    keep = torch.zeros(4, 8, dtype=torch.bool)
    keep[:, ::2] = True  # 16 of 32 kept
    sizes = sparse_sizes(keep, 4, "2:4")
    assert sizes["dense"] == 128
    assert sizes["bitmask"] == 16 * 4 + 4
    assert sizes["csr"] == 16 * (4 + 2) + 5 * 4
    assert sizes["2:4"] == 16 * 4 + 4  # 2 bits of position per kept value

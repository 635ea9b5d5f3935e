"""Per-layer diagnosis: which layers' outputs moved most after compression.

A `capture.LayerOutputs` recorder per model records each named layer's output on the same batch (one
calibration pass of each model, batch by batch: one batch of layer outputs is held); the SQNR of the
compressed layer output against the original one is accumulated over all batches. Errors
accumulate through the network, so the ranking uses the SQNR *drop* relative to the layer's
input-side neighbour as well: a layer whose SQNR is far below the one before it is where damage
enters. Suggested exclusions are the worst layers by that drop.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compression.evaluate.fidelity import energy_sums
from compression.primitives.capture import LayerOutputs, calibrate
from compression.types import Batches


class _OutputEnergy:
    """Accumulates ‖ref‖² and ‖ref − out‖² per layer across batches."""

    def __init__(self, names: list[str]) -> None:
        self.signal = dict.fromkeys(names, 0.0)
        self.noise = dict.fromkeys(names, 0.0)

    def sqnr(self, name: str) -> float | None:
        if self.signal[name] == 0 and self.noise[name] == 0:
            return None
        if self.noise[name] == 0:
            return math.inf
        return 10 * math.log10(max(self.signal[name], 1e-300) / self.noise[name])


@torch.no_grad()
def layer_sqnr(
    original: nn.Module, compressed: nn.Module, batches: Batches, layer_names: list[str]
) -> dict[str, float | None]:
    """Output SQNR (dB) of each named layer, compressed vs original, summed over `batches`."""
    energy = _OutputEnergy(layer_names)
    ref_out, new_out = LayerOutputs(layer_names), LayerOutputs(layer_names)
    original.eval()
    compressed.eval()
    for batch in batches:
        calibrate(original, [batch], [ref_out])
        calibrate(compressed, [batch], [new_out])
        for name in layer_names:
            ref, new = ref_out.outputs.get(name), new_out.outputs.get(name)
            if ref is None or new is None or ref.shape != new.shape:
                continue
            signal, noise = energy_sums(ref, new)
            energy.signal[name] += signal
            energy.noise[name] += noise
    return {name: energy.sqnr(name) for name in layer_names}


def layer_diagnosis(
    original: nn.Module,
    compressed: nn.Module,
    batches: Batches,
    layer_names: list[str],
    top_k: int = 5,
    *,
    exclusion_floor_db: float = 20.0,
) -> dict[str, Any]:
    """Per-layer output SQNR, the `top_k` worst layers, and suggested `skip_layers`.

    A layer is suggested for exclusion when it is among the worst `top_k` by SQNR drop and its own
    SQNR is below `exclusion_floor_db` (≈1 % relative output error at 20 dB).
    """
    sqnr = layer_sqnr(original, compressed, batches, layer_names)
    measured = [n for n in layer_names if sqnr[n] is not None and not math.isinf(sqnr[n])]
    drops: dict[str, float] = {}
    previous = math.inf
    for name in measured:
        drops[name] = (previous - sqnr[name]) if not math.isinf(previous) else 0.0
        previous = sqnr[name]
    worst = sorted(measured, key=lambda n: sqnr[n])[:top_k]
    by_drop = sorted(measured, key=lambda n: -drops[n])[:top_k]
    suggested = [n for n in by_drop if sqnr[n] < exclusion_floor_db]
    if measured and sqnr[worst[0]] < exclusion_floor_db and worst[0] not in suggested:
        suggested.insert(0, worst[0])
    return {
        "layers": [{"name": n, "sqnr_db": sqnr[n], "sqnr_drop_db": drops.get(n)} for n in layer_names],
        "worst": [{"name": n, "sqnr_db": sqnr[n]} for n in worst],
        "largest_drop": [{"name": n, "sqnr_drop_db": drops[n]} for n in by_drop],
        "suggested_skip_layers": suggested[:top_k],
        "exclusion_floor_db": exclusion_floor_db,
    }

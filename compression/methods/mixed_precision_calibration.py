"""mixed_precision, its one calibration pass: the float model runs once over the calibration samples
(`capture.calibrate`) and every later step reads what it needs from the recorders of that pass:
- MACs per sample over all batches (BitOps budget, layers never called), shared-input stages (ties) of
  batch 0;
- the per-layer Hessians of GPTQ / decoupleQ candidates, on the fitting samples;
- the float reference outputs (sensitivity metrics and every Pareto point's measurement) and the replay
  checkpoints of the sensitivity pass, on the measured samples;
- the repeated blocks' float inputs, from which each budget's block-by-block re-quantization starts.
The batches are cut once where the measured samples begin (`calibration_pieces`), so the fitting and the
measured samples are whole batches of the same pass. Held for the whole sweep: the Hessians, the
reference outputs, the replay checkpoints (within the sensitivity byte budget) and block 0's hidden states
of every batch with each block's other call arguments.

What still runs after the pass, and why it cannot come from it:
- the sensitivity measurements: the model with one unit quantized, replaying the recorded float blocks
  (one replayed forward first checks that the replay reproduces the reference outputs);
- gptq / decoupleq, per budget, the true-sequential re-quantization (`sequential.quantize_sequentially`):
  by design each stage's Hessians are taken on the outputs of the already-quantized blocks and stages, so
  the blocks run again on quantized inputs (block forwards, starting from the recorded block-0 inputs).
  A model without repeated blocks is one block: per budget one forward of batch 0 finds its stages and
  the first stage's Hessians come from forwards stopped once that stage ran, both still on float weights;
- each Pareto point's measurement of its quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compression.configs import MixedPrecisionConfig
from compression.primitives.capture import BlockOutputs, Hessians, Macs, Outputs, Stages, calibrate
from compression.primitives.sensitivity import REPLAY_BYTES, FloatRecord, count_samples, split_samples
from compression.primitives.sequential import BlockCapture, batches_on, block_args_recorder, find_blocks
from compression.types import Batches


@dataclass
class FloatPass:
    """What the one pass of the float model recorded, and which batches it ran on."""

    batches: Batches  # on the model's device, cut where the measured samples begin
    fit: range  # batches the candidates are fitted on
    measure: range  # batches the sensitivity pass measures on
    holdout: bool  # `fit` and `measure` are disjoint
    macs: dict[str, float]  # per sample; 0: never called
    stages: list[list[str]]  # layers reading the same input tensor (batch 0)
    hessians: Hessians | None  # None for rtn
    blocks: BlockCapture
    reference: list[torch.Tensor]  # float outputs of every batch
    record: FloatRecord  # reference and replay checkpoints of the measured batches

    def measured_batches(self) -> Batches:
        labels = None if self.batches.labels is None else self.batches.labels[self.measure.start :]
        return Batches(self.batches.inputs[self.measure.start :], labels)


def calibration_pieces(calib: Batches, config: MixedPrecisionConfig) -> tuple[Batches, range, range, bool]:
    """(the batches cut where the last `sensitivity_samples` begin, fitting batches, measured batches,
    held out?). Data-driven quantizers fit on the samples before the measured ones when at least as many
    remain, else on everything (a sensitivity measured on the fitted data is optimistic)."""
    total = count_samples(calib)
    count = min(config.sensitivity_samples, total)
    head, tail = split_samples(calib, total - count)
    labels = None if calib.labels is None else [*(head.labels or []), *(tail.labels or [])]
    pieces = Batches([*head.inputs, *tail.inputs], labels)
    measure = range(len(head), len(pieces))
    holdout = config.quantizer != "rtn" and config.sensitivity_holdout and total - count >= count
    return pieces, range(len(head)) if holdout else range(len(pieces)), measure, holdout


def _on_device(pieces: Batches, device: torch.device) -> Batches:
    labels = None if pieces.labels is None else [label.to(device) for label in pieces.labels]
    return Batches(batches_on(pieces, device), labels)


def float_pass(
    model: nn.Module, calib: Batches, layers: dict[str, nn.Module], config: MixedPrecisionConfig
) -> FloatPass:
    """Cut the batches, move them to the model's device and run the one calibration pass."""
    pieces, fit, measure, holdout = calibration_pieces(calib, config)
    batches = _on_device(pieces, next(model.parameters()).device)
    found, args = find_blocks(model), block_args_recorder(model)
    outputs, macs, stages = Outputs(), Macs(layers), Stages(layers)
    hessians = None if config.quantizer == "rtn" else Hessians(layers, fit)
    measured = batches.inputs[measure.start :]
    replay = None if found is None else BlockOutputs(found[1], measured, measure.start, REPLAY_BYTES)
    optional = (hessians, replay, None if args is None else args[1])
    calibrate(model, batches.inputs, [outputs, macs, stages, *(r for r in optional if r is not None)])
    return FloatPass(
        batches=batches,
        fit=fit,
        measure=measure,
        holdout=holdout,
        macs=macs.per_sample(),
        stages=stages.stages(),
        hessians=hessians,
        blocks=BlockCapture(None, None) if args is None else BlockCapture(args[0], args[1].inputs()),
        reference=outputs.outputs,
        record=FloatRecord(outputs.outputs[measure.start :], found, {} if replay is None else replay.records()),
    )

"""Data planning: which batches the method gets, which ones fidelity is measured on, and why.

Rules (stated in `report["data"]`): methods that need calibration data use the calibration set, else
the evaluation set (said so), else the job fails with `calibration_required`. Fidelity is measured on
the evaluation set, else on the calibration set (optimistic: said so), else on a few synthetic inputs
(said so; no task metric then).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compression.configs import MethodConfigBase
from compression.io import LoadedModel, load_batches
from compression.io.model import InputSpec
from compression.pipeline.context import JobError, JobSpec
from compression.types import Batches

SYNTHETIC_SAMPLES = 32
# fp32 logits one forward may produce (512 MB): a 262k-vocabulary LM at 512 tokens gets one row per
# batch, where 8 rows (and the float64 copies the fidelity metrics take) would need tens of GB.
LOGITS_PER_FORWARD = 1 << 27


def synthetic_batches(specs: list[InputSpec], loaded: LoadedModel, count: int, seq_len: int) -> Batches:
    generator = torch.Generator().manual_seed(0)
    vocab = getattr(loaded.tokenizer, "vocab_size", None) or 1000
    batch: dict[str, torch.Tensor] = {}
    for spec in specs:
        shape = [count if i == 0 and d is None else (d or min(seq_len, 32)) for i, d in enumerate(spec.shape)]
        if spec.dtype.startswith("float"):
            batch[spec.name] = torch.randn(shape, generator=generator).to(getattr(torch, spec.dtype))
        elif spec.name == "attention_mask":
            batch[spec.name] = torch.ones(shape, dtype=torch.long)
        else:
            batch[spec.name] = torch.randint(0, vocab, shape, generator=generator, dtype=getattr(torch, spec.dtype))
    return Batches(inputs=[batch])


def sample_caps(spec: JobSpec, loaded: LoadedModel) -> tuple[int, int]:
    """(calibration, evaluation) sample caps; LM windows are long, so far fewer of them."""
    if loaded.task == "causal_lm":
        return min(spec.calibration_samples, 32), min(spec.evaluation_samples, 16)
    return spec.calibration_samples, spec.evaluation_samples


def rows_per_forward(loaded: LoadedModel, seq_len: int, wanted: int) -> int:
    """`wanted`, or fewer rows for a causal LM whose logits would pass LOGITS_PER_FORWARD (at least 1)."""
    vocab = (loaded.info.get("vocab_size") or 0) if loaded.task == "causal_lm" else 0
    return max(1, min(wanted, LOGITS_PER_FORWARD // max(1, seq_len * vocab)))


def latency_batches(loaded: LoadedModel, seq_len: int) -> tuple[int, ...]:
    """ORT batch sizes to time: 1 and 32, the larger one capped like every other forward."""
    return tuple(sorted({1, rows_per_forward(loaded, seq_len, 32)}))


def read_dataset(path: Path | None, loaded: LoadedModel, spec: JobSpec, cap: int) -> Batches | None:
    if path is None:
        return None
    batch = rows_per_forward(loaded, spec.seq_len, 8 if loaded.task == "causal_lm" else spec.batch_size)
    return load_batches(
        path, loaded, batch_size=batch, max_samples=cap, seq_len=spec.seq_len, limits=spec.archive_limits
    )


def _describe(batches: Batches | None, source: str | None) -> dict[str, Any] | None:
    if batches is None:
        return None
    samples = sum(next(iter(b.values())).shape[0] for b in batches.inputs)
    return {
        "source": source,
        "samples": samples,
        "batches": len(batches),
        "labels": batches.labels is not None,
    }


def head(batches: Batches, samples: int) -> Batches:
    """The first `samples` rows of `batches` (whole batches, the last one cut)."""
    inputs, labels, left = [], [], samples
    for index, batch in enumerate(batches.inputs):
        if left <= 0:
            break
        inputs.append({name: tensor[:left] for name, tensor in batch.items()})
        if batches.labels is not None:
            labels.append(batches.labels[index][:left])
        left -= next(iter(batch.values())).shape[0]
    return Batches(inputs=inputs, labels=labels if batches.labels is not None else None)


def plan_data(
    config: MethodConfigBase,
    calib: Batches | None,
    evaluation: Batches | None,
    loaded: LoadedModel,
    *,
    seq_len: int,
    calibration_cap: int,
) -> tuple[Batches | None, Batches, dict[str, Any]]:
    """(batches for the method, batches for fidelity, the report's `data` section)."""
    notes: list[str] = []
    method_data, method_source = calib, "calibration" if calib is not None else None
    if config.needs_calibration and calib is None:
        if evaluation is None:
            raise JobError("calibration_required", f"{config.method} needs calibration data; none was given")
        method_data, method_source = head(evaluation, calibration_cap), "evaluation"
        notes.append(f"{config.method} needs calibration data and none was given: it used the evaluation set")
    eval_data, eval_source = evaluation, "evaluation"
    if evaluation is None and calib is not None:
        eval_data, eval_source = calib, "calibration"
        notes.append("no evaluation set: fidelity measured on the calibration data (optimistic)")
    if eval_data is None:
        eval_data = synthetic_batches(loaded.input_specs, loaded, SYNTHETIC_SAMPLES, seq_len)
        eval_source = "synthetic"
        notes.append(f"no data at all: fidelity on {SYNTHETIC_SAMPLES} synthetic random inputs, no task metric")
    section = {
        "calibration": _describe(calib, "calibration"),
        "evaluation": _describe(eval_data, eval_source),
        "method_data": _describe(method_data, method_source),
        "used_for": {"method": method_source, "fidelity": eval_source},
        "notes": notes,
    }
    return method_data, eval_data, section

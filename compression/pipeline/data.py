"""Data planning: which batches the method gets, which ones fidelity is measured on, and why.

Rules (stated in `report["data"]`): calibration and evaluation never share a sample. Two different
datasets are used as given. One dataset (only a calibration set; only an evaluation set for a method
that needs calibration data; or the same dataset, by id, content hash or path, given for both) is
split by `SPLIT_RULE` and the split recorded in `report["data"]["split"]`. An evaluation set alone,
for a method that needs no data, is all evaluation. With no data at all, export and latency run on a
few synthetic inputs and the gate's verdict is `inconclusive` (there is nothing to judge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compression.configs import MethodConfigBase
from compression.io import LoadedModel, load_batches
from compression.io.loaded import InputSpec
from compression.pipeline.context import JobError, JobSpec
from compression.types import Batches

SYNTHETIC_SAMPLES = 32
SPLIT_RULE = "every k-th sample (index % k == k - 1) to evaluation, the rest to calibration"
SPLIT_SAMPLES_PER_K = 32  # k = samples // 32, kept within [2, 5]: small sets split in half, large ones 4:1
# fp32 logits one forward may produce (512 MB): a 262k-vocabulary LM at 512 tokens gets one row per
# batch, where 8 rows (and the float64 copies the fidelity metrics take) would need tens of GB.
LOGITS_PER_FORWARD = 1 << 27


def synthetic_batches(specs: list[InputSpec], loaded: LoadedModel, count: int, seq_len: int) -> Batches:
    generator = torch.Generator().manual_seed(0)
    vocab = getattr(loaded.tokenizer, "vocab_size", None) or loaded.info.get("vocab_size") or 1000
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


def sample_caps(spec: JobSpec, loaded: LoadedModel, config: MethodConfigBase) -> tuple[int, int]:
    """(calibration, evaluation) sample caps: the method's calibration cap (the job's unless the method
    states its own); LM windows are long, so far fewer of them."""
    calibration = config.calibration_cap(spec.calibration_samples)
    if loaded.task == "causal_lm":
        return min(calibration, 32), min(spec.evaluation_samples, 16)
    return calibration, spec.evaluation_samples


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


def split_step(samples: int) -> int:
    """k of `SPLIT_RULE`: every k-th sample goes to evaluation."""
    return min(5, max(2, samples // SPLIT_SAMPLES_PER_K))


def batch_rows(batches: Batches) -> int:
    return sum(next(iter(b.values())).shape[0] for b in batches.inputs)


def split_batches(batches: Batches, step: int) -> tuple[Batches, Batches]:
    """(calibration, evaluation) rows of `batches` by `SPLIT_RULE`; batches keep their order and padding."""
    parts: dict[bool, Batches] = {
        held: Batches(inputs=[], labels=[] if batches.labels is not None else None) for held in (False, True)
    }
    start = 0
    for index, batch in enumerate(batches.inputs):
        rows = next(iter(batch.values())).shape[0]
        held_out = (torch.arange(start, start + rows) % step) == step - 1
        start += rows
        for held, part in parts.items():
            keep = held_out if held else ~held_out
            if not bool(keep.any()):
                continue
            part.inputs.append({name: tensor[keep] for name, tensor in batch.items()})
            if part.labels is not None:
                part.labels.append(batches.labels[index][keep])
    return parts[False], parts[True]


def _same_dataset(spec: JobSpec) -> bool:
    """Calibration and evaluation are one dataset: same id, same content hash, or the same file."""
    calibration, evaluation = spec.calibration_path, spec.evaluation_path
    if calibration is None or evaluation is None:
        return False
    same_id = spec.calibration_id is not None and spec.calibration_id == spec.evaluation_id
    same_hash = spec.calibration_sha256 is not None and spec.calibration_sha256 == spec.evaluation_sha256
    return same_id or same_hash or Path(calibration).resolve() == Path(evaluation).resolve()


def _split_source(spec: JobSpec, config: MethodConfigBase) -> tuple[Path, str] | None:
    """(the one dataset to split, its name for the report), or None when no split is needed."""
    if _same_dataset(spec) or (spec.evaluation_path is not None and spec.calibration_path is None):
        if spec.calibration_path is None and not config.needs_calibration:
            return None  # nothing calibrates: the whole evaluation set is held out already
        return Path(spec.evaluation_path), spec.evaluation_id or "evaluation"  # type: ignore[arg-type]
    if spec.calibration_path is not None and spec.evaluation_path is None:
        return Path(spec.calibration_path), spec.calibration_id or "calibration"
    return None


def read_job_data(
    spec: JobSpec, loaded: LoadedModel, config: MethodConfigBase
) -> tuple[Batches | None, Batches | None, dict[str, Any] | None]:
    """(calibration, evaluation, the split or None): disjoint by construction (module docstring)."""
    calibration_cap, evaluation_cap = sample_caps(spec, loaded, config)
    source = _split_source(spec, config)
    if source is None:
        calibration = read_dataset(spec.calibration_path, loaded, spec, calibration_cap)
        return calibration, read_dataset(spec.evaluation_path, loaded, spec, evaluation_cap), None
    path, name = source
    whole = read_dataset(path, loaded, spec, calibration_cap + evaluation_cap)
    assert whole is not None
    if batch_rows(whole) < 2:
        raise JobError("dataset_too_small", f"{name} holds {batch_rows(whole)} sample(s); a split needs 2")
    step = split_step(batch_rows(whole))
    calibration, evaluation = split_batches(whole, step)
    calibration, evaluation = head(calibration, calibration_cap), head(evaluation, evaluation_cap)
    split = {
        "from": name,
        "rule": f"{SPLIT_RULE}; k = {step}",
        "calibration": batch_rows(calibration),
        "evaluation": batch_rows(evaluation),
    }
    return calibration, evaluation, split


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
    split: dict[str, Any] | None = None,
    calibration_cap: int | None = None,
) -> tuple[Batches | None, Batches, dict[str, Any]]:
    """(batches for the method, batches for fidelity, the report's `data` section); `calibration_cap`: the
    most calibration samples the job read (stated in the section)."""
    notes: list[str] = []
    if calib is not None and calibration_cap is not None:
        cap = f"calibration data read up to {calibration_cap} samples ({config.method})"
        notes.append(f"{cap}; {batch_rows(calib)} read")
    if config.needs_calibration and calib is None:
        raise JobError("calibration_required", f"{config.method} needs calibration data; none was given")
    if split is not None:
        notes.append(
            f"one dataset ({split['from']}) split into {split['calibration']} calibration and "
            f"{split['evaluation']} held-out evaluation samples: {split['rule']}"
        )
    eval_data, eval_source = evaluation, "evaluation"
    if eval_data is None:
        eval_data = synthetic_batches(loaded.input_specs, loaded, SYNTHETIC_SAMPLES, seq_len)
        eval_source = "synthetic"
        notes.append(
            f"no evaluation data: export and latency on {SYNTHETIC_SAMPLES} synthetic inputs, no task metric; "
            "the gate's verdict is inconclusive"
        )
    method_source = "calibration" if calib is not None else None
    described = _describe(calib, "calibration")
    if described is not None:
        described["cap"] = calibration_cap
    section = {
        "calibration": described,
        "evaluation": _describe(eval_data, eval_source),
        "method_data": _describe(calib, method_source),
        "used_for": {"method": method_source, "fidelity": eval_source},
        "split": split,
        "notes": notes,
    }
    return calib, eval_data, section

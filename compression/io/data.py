"""Calibration / evaluation data -> `Batches`: `.npz` arrays named after the model inputs, or text.

Text (`.txt`: one sample per non-empty line; `.jsonl`: field `text`) needs a model with a tokenizer:
- causal LMs: the whole text is tokenized and cut into fixed windows of `seq_len` tokens, each
  starting with the BOS token when the tokenizer has one; labels are the input ids (perplexity);
- encoders / classifiers: one sample per line, padded per batch, truncated at `seq_len`.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from compression.archives import ArchiveLimits, ArchiveRefused, npz_headers
from compression.io.errors import DatasetError
from compression.io.loaded import InputSpec, LoadedModel
from compression.types import Batches

_KIND = {"f": "float", "i": "int", "u": "int", "b": "bool"}


def _spec_kind(dtype: str) -> str:
    return "bool" if dtype == "bool" else "float" if dtype.startswith("float") else "int"


def _check_array(name: str, array: np.ndarray, spec: InputSpec) -> np.ndarray:
    if _KIND.get(array.dtype.kind) != _spec_kind(spec.dtype):
        raise DatasetError("dataset_mismatch", f"array '{name}' has dtype {array.dtype}; the model wants {spec.dtype}")
    if len(spec.shape) and array.ndim != len(spec.shape):
        raise DatasetError(
            "dataset_mismatch",
            f"array '{name}' has shape {array.shape}; the model wants rank {len(spec.shape)}",
        )
    for axis, want in enumerate(spec.shape[1:], start=1):
        if want is not None and array.shape[axis] != want:
            raise DatasetError(
                "dataset_mismatch", f"array '{name}' has shape {array.shape}; the model wants {spec.shape}"
            )
    return array.astype(spec.dtype if spec.dtype != "unknown" else array.dtype, copy=False)


def _read_npz(path: Path, limits: ArchiveLimits) -> dict[str, np.ndarray]:
    """Arrays are read only after the `.npy` headers and the zip's sizes pass `limits` (no bombs)."""
    try:
        npz_headers(path, path.stat().st_size, limits)
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError("invalid_dataset", f"unreadable .npz (pickled arrays are refused): {error}") from error
    except ArchiveRefused as error:
        raise DatasetError(error.code, error.message) from error


def npz_batches(
    path: Path, loaded: LoadedModel, batch_size: int, max_samples: int | None, limits: ArchiveLimits | None = None
) -> Batches:
    arrays = _read_npz(path, limits or ArchiveLimits())
    labels = arrays.pop("labels", None)
    wanted = {spec.name: spec for spec in loaded.input_specs}
    optional = _OPTIONAL_HF_INPUTS if loaded.format == "hf_dir" else set()
    missing = [name for name in wanted if name not in arrays and name not in optional]
    unknown = [name for name in arrays if name not in wanted]
    if missing or unknown:
        raise DatasetError(
            "dataset_mismatch",
            f"arrays must be named after the model inputs {sorted(wanted)} (+ optional 'labels'); "
            f"missing {missing}, unexpected {unknown}",
        )
    checked = {name: _check_array(name, arrays[name], wanted[name]) for name in arrays}
    counts = {len(a) for a in checked.values()} | ({len(labels)} if labels is not None else set())
    if len(counts) != 1:
        raise DatasetError("dataset_mismatch", f"arrays disagree on the sample count: {sorted(counts)}")
    total = counts.pop() if max_samples is None else min(counts.pop(), max_samples)
    fixed = _fixed_batch(loaded)
    batch_size = fixed or batch_size
    usable = total - total % fixed if fixed else total
    batches = Batches(inputs=[], labels=[] if labels is not None else None)
    for start in range(0, usable, batch_size):
        stop = min(start + batch_size, total)
        batches.inputs.append({n: torch.from_numpy(np.ascontiguousarray(a[start:stop])) for n, a in checked.items()})
        if labels is not None:
            batches.labels.append(torch.from_numpy(np.ascontiguousarray(labels[start:stop])))
    if not batches.inputs:
        raise DatasetError("dataset_mismatch", "the dataset holds no complete batch for this model")
    return batches


_OPTIONAL_HF_INPUTS = {"attention_mask", "token_type_ids"}


def _fixed_batch(loaded: LoadedModel) -> int | None:
    """The batch size a model exported with a static batch dimension accepts (None when dynamic)."""
    sizes = {spec.shape[0] for spec in loaded.input_specs if spec.shape}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def read_texts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError("invalid_dataset", f"text data must be UTF-8: {error}") from error
    if path.suffix.lower() != ".jsonl" and not _looks_like_jsonl(lines):
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.extend(
                [str(record["text_a"]), str(record["text_b"])] if "text_a" in record else [str(record["text"])]
            )
        except (ValueError, KeyError, TypeError) as error:
            raise DatasetError(
                "invalid_dataset", f"line {number}: each JSON line needs 'text' (or 'text_a', 'text_b', 'score')"
            ) from error
    return texts


def read_pairs(path: Path) -> list[tuple[str, str, float]] | None:
    """Scored sentence pairs (`.jsonl` with text_a, text_b, score) for Spearman; None for other data."""
    if path.suffix.lower() not in (".jsonl", ".txt", ".json"):
        return None
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError):
        return None
    if not records or not all(isinstance(r, dict) and {"text_a", "text_b", "score"} <= set(r) for r in records):
        return None
    return [(str(r["text_a"]), str(r["text_b"]), float(r["score"])) for r in records]


def _looks_like_jsonl(lines: list[str]) -> bool:
    first = next((line for line in lines if line.strip()), "")
    return first.lstrip().startswith("{") and ('"text"' in first or '"text_a"' in first)


def causal_lm_windows(tokenizer: object, texts: list[str], seq_len: int) -> torch.Tensor:
    """[windows, seq_len] token ids: BOS (when the tokenizer has one) + seq_len-1 text tokens each."""
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - 1 if bos is not None else seq_len
    count = len(ids) // body
    if count == 0:
        raise DatasetError("dataset_mismatch", f"the text holds {len(ids)} tokens, fewer than one window of {body}")
    windows = torch.tensor(ids[: count * body], dtype=torch.long).reshape(count, body)
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def text_batches(path: Path, loaded: LoadedModel, batch_size: int, max_samples: int | None, seq_len: int) -> Batches:
    texts = read_texts(path)
    if loaded.tokenizer is None:
        raise DatasetError("dataset_mismatch", "text data needs a model with a tokenizer; upload a .npz instead")
    if not texts:
        raise DatasetError("dataset_mismatch", "the text file holds no samples")
    if loaded.task == "causal_lm":
        windows = causal_lm_windows(loaded.tokenizer, texts, seq_len)[:max_samples]
        inputs = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in windows.split(batch_size)]
        return Batches(inputs=inputs, labels=[batch["input_ids"] for batch in inputs])
    texts = texts[:max_samples]
    inputs = []
    for start in range(0, len(texts), batch_size):
        encoded = loaded.tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=seq_len,
            return_tensors="pt",
        )
        inputs.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return Batches(inputs=inputs)


def load_batches(
    path: Path,
    loaded: LoadedModel,
    *,
    batch_size: int = 64,
    max_samples: int | None = None,
    seq_len: int = 512,
    limits: ArchiveLimits | None = None,
) -> Batches:
    """Read `.npz` or text data for `loaded`; raises DatasetError(invalid_dataset | dataset_mismatch |
    archive_too_large | decompression_bomb)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return npz_batches(path, loaded, batch_size, max_samples, limits)
    return text_batches(path, loaded, batch_size, max_samples, seq_len)

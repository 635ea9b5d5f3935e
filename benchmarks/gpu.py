"""Quantization and pruning on CUDA against the CPU: the same method, config, calibration data and seed on
both devices, with wall time, peak GPU memory, and how closely the two results agree.

- Fashion-MNIST ResNet (the committed fixture, real data): RTN, GPTQ, decoupleQ (layer-wise and with its
  block-wise stage) at W4 per channel, structured pruning (50% FLOPs, BN recalibration), UDFC data-free;
  calibration = the first 512 train images; top-1 of each result on the 10k test images, evaluated on the CPU,
  and the top-1 agreement of the CPU and GPU results.
- A Llama-architecture decoder with random weights built here (`--llama-layers`, `--llama-hidden`; fp32, as
  the service loads it): RTN, GPTQ and decoupleQ layer-wise at W4 g128 on 32 random 256-token windows; the
  relative difference of the CPU and GPU results' logits on held-out windows.

    .venv/bin/python benchmarks/gpu.py                 # needs a CUDA device; refuses with a message otherwise
    .venv/bin/python benchmarks/gpu.py --skip-cpu      # GPU timings only (no CPU reference run)

Writes benchmarks/results/gpu.json (rows + a `table` for benchmarks/render_readme.py). `--device cpu` runs
the whole script with the CPU standing in for the GPU, to check the script itself where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compression.configs import (  # noqa: E402
    DataFreeConfig,
    DecoupleQConfig,
    GPTQConfig,
    MethodConfigBase,
    PruneStructuredConfig,
    RTNConfig,
)
from compression.io.hf import CausalLMLogits  # noqa: E402
from compression.pipeline.context import to_device  # noqa: E402
from compression.registry import compress  # noqa: E402
from compression.types import Batches, CompressionResult  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
RESNET_CASES: dict[str, MethodConfigBase] = {
    "rtn W4": RTNConfig(bits=4, group_size=None),
    "gptq W4": GPTQConfig(bits=4, group_size=None),
    "decoupleq W4 layer-wise": DecoupleQConfig(bits=4, group_size=None, blockwise=False),
    "decoupleq W4 block-wise": DecoupleQConfig(bits=4, group_size=None),
    "prune_structured 50% FLOPs": PruneStructuredConfig(target={"metric": "flops", "reduction": 0.5}),
    "data_free 30% + W6": DataFreeConfig(),
}
LLAMA_CASES: dict[str, MethodConfigBase] = {
    "rtn W4 g128": RTNConfig(bits=4, group_size=128),
    "gptq W4 g128": GPTQConfig(bits=4, group_size=128),
    "decoupleq W4 g128 layer-wise": DecoupleQConfig(bits=4, group_size=128, blockwise=False),
}


def no_cuda_message(device: str) -> str | None:
    if device != "cuda" or torch.cuda.is_available():
        return None
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"benchmarks/gpu.py needs a CUDA device and this machine shows none (torch {torch.__version__}, {build}). "
        "Run it where `python -c 'import torch; print(torch.cuda.is_available())'` prints True, with the CUDA "
        "build of torch (see the Dockerfile's worker image)."
    )


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_compress(model: nn.Module, calib: Batches, config: MethodConfigBase, device: str) -> dict[str, Any]:
    """Compress on `device` (model and data moved there first, as the worker does); wall time and peak memory."""
    torch.manual_seed(0)
    moved, data = model.to(device), to_device(calib, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    result = compress(moved, data, config)
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    result.model.to("cpu")
    model.to("cpu")
    return {"result": result, "seconds": round(seconds, 2), "peak_gpu_mb": peak and round(peak, 1)}


def resnet_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from compression.zoo.fmnist_resnet import load_fashion_mnist, load_pretrained

    model = load_pretrained().eval()
    train, _ = load_fashion_mnist("train", limit=512)
    test, labels = load_fashion_mnist("test")
    calib = Batches([{"input": train[i : i + 128]} for i in range(0, len(train), 128)])

    def predict(candidate: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([candidate.eval()(test[i : i + 1000]).argmax(1) for i in range(0, len(test), 1000)])

    def compare(cpu: CompressionResult, gpu: CompressionResult) -> dict[str, Any]:
        cpu_pred, gpu_pred = predict(cpu.model), predict(gpu.model)
        return {
            "metric": f"top-1 {(gpu_pred == labels).float().mean().item():.4f}",
            "cpu_metric": f"top-1 {(cpu_pred == labels).float().mean().item():.4f}",
            "agreement": f"top-1 agreement {(cpu_pred == gpu_pred).float().mean().item():.4f}",
        }

    def quality(result: CompressionResult) -> dict[str, Any]:
        return {"metric": f"top-1 {(predict(result.model) == labels).float().mean().item():.4f}"}

    return run_cases("Fashion-MNIST ResNet", model, calib, RESNET_CASES, compare, quality, args)


def build_llama(layers: int, hidden: int) -> CausalLMLogits:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=512,
    )
    return CausalLMLogits(transformers.LlamaForCausalLM(config).eval()).eval()


def llama_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = build_llama(args.llama_layers, args.llama_hidden)
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 32000, (40, 256), generator=generator)
    calib = Batches([{"input_ids": windows[i : i + 4]} for i in range(0, 32, 4)])
    held_out = windows[32:]

    def logits(candidate: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return candidate.eval()(input_ids=held_out).float()

    def compare(cpu: CompressionResult, gpu: CompressionResult) -> dict[str, Any]:
        a, b = logits(cpu.model), logits(gpu.model)
        return {
            "metric": "",
            "cpu_metric": "",
            "agreement": f"logits rel. diff {((a - b).norm() / a.norm()).item():.2e}",
        }

    def quality(result: CompressionResult) -> dict[str, Any]:
        return {"metric": ""}

    params = sum(p.numel() for p in model.parameters())
    name = f"Llama-arch random {params / 1e6:.0f}M ({args.llama_layers} layers, hidden {args.llama_hidden})"
    return run_cases(name, model, calib, LLAMA_CASES, compare, quality, args)


def run_cases(
    model_name: str,
    model: nn.Module,
    calib: Batches,
    cases: dict[str, MethodConfigBase],
    compare: Callable[[CompressionResult, CompressionResult], dict[str, Any]],
    quality: Callable[[CompressionResult], dict[str, Any]],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    rows = []
    for setting, config in cases.items():
        if args.methods and not any(word in setting for word in args.methods.split(",")):
            continue
        on_gpu = timed_compress(model, calib, config, args.device)
        row: dict[str, Any] = {"model": model_name, "setting": setting, "gpu_s": on_gpu["seconds"]}
        row["peak_gpu_mb"] = on_gpu["peak_gpu_mb"]
        if args.skip_cpu:
            row |= quality(on_gpu["result"])
        else:
            on_cpu = timed_compress(model, calib, config, "cpu")
            row |= {"cpu_s": on_cpu["seconds"], "speedup": round(on_cpu["seconds"] / max(on_gpu["seconds"], 1e-9), 2)}
            row |= compare(on_cpu["result"], on_gpu["result"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    columns = ["model", "setting", "CPU s", "GPU s", "speedup", "peak GPU MB", "GPU result", "CPU result", "CPU vs GPU"]
    keys = ["model", "setting", "cpu_s", "gpu_s", "speedup", "peak_gpu_mb", "metric", "cpu_metric", "agreement"]
    return {"columns": columns, "rows": [[row.get(key) for key in keys] for row in rows]}


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    info |= {"machine": platform.machine(), "cpus": os.cpu_count(), "device": device}
    if device == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: check the script only")
    parser.add_argument("--only", choices=["resnet", "llama"], default=None)
    parser.add_argument("--methods", default="", help="comma-separated words; only settings containing one run")
    parser.add_argument("--skip-cpu", action="store_true", help="no CPU reference runs (GPU timings only)")
    parser.add_argument("--llama-layers", type=int, default=8)
    parser.add_argument("--llama-hidden", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if message := no_cuda_message(args.device):
        print(message, file=sys.stderr)
        return 2
    rows = [] if args.only == "llama" else resnet_rows(args)
    rows += [] if args.only == "resnet" else llama_rows(args)
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:])
    env = environment(args.device)
    notes = [f"`{command.strip()}`", ", ".join(f"{key}: {value}" for key, value in env.items())]
    data = {"environment": env, "command": command.strip(), "rows": rows, "table": table(rows), "notes": notes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

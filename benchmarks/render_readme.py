"""Regenerate the README's benchmark tables from benchmarks/results/*.json.

    .venv/bin/python benchmarks/render_readme.py

Each table sits between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` in README.md. A
results file renders through its own function below, or generically from a `table` entry
(`{"columns": [...], "rows": [[...], ...]}`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_service(data: dict[str, Any]) -> str:
    rows = []
    for result in data["results"]:
        for poll in result["polling"]:
            anchor = poll.get("anchor", {})
            rows.append(
                [
                    result["deployment"],
                    f"GET /v1/jobs/{{id}} x{poll['clients']} clients",
                    poll["throughput_rps"],
                    poll["p50_ms"],
                    poll["p99_ms"],
                    poll["errors"],
                    anchor.get("throughput_rps"),
                    anchor.get("p50_ms"),
                    anchor.get("p99_ms"),
                    poll.get("ratio"),
                ]
            )
    columns = ["deployment", "load", "req/s", "p50 ms", "p99 ms", "errors"]
    columns += ["anchor req/s", "anchor p50 ms", "anchor p99 ms", "ratio"]
    table = markdown_table(columns, rows)
    extra = [
        [
            r["deployment"],
            r["enqueue_to_start"]["median_s"],
            r["enqueue_to_start"]["max_s"],
            r["upload"]["upload_mb"],
            r["upload"]["mb_per_s"],
            r["upload"]["rss_before_mb"],
            r["upload"]["peak_rss_mb"],
        ]
        for r in data["results"]
    ]
    table2 = markdown_table(
        ["deployment", "enqueue→start median s", "max s", "upload MB", "MB/s", "API RSS before MB", "API peak RSS MB"],
        extra,
    )
    notes = "\n" + "".join(f"\n- {note}" for note in data["notes"]) if data.get("notes") else ""
    return f"{table}\n\n{table2}\n\n_{data.get('machine', '')}; args {data.get('args')}_{notes}"


def render_generic(data: dict[str, Any]) -> str:
    """A `table`, or several `tables` (each with a `title`), then the `notes` as a list."""
    tables = data.get("tables") or ([data["table"]] if data.get("table") else [])
    if not tables:
        return "_no table in results_"
    notes = data.get("notes")
    parts = [(f"{t['title']}:\n\n" if t.get("title") else "") + markdown_table(t["columns"], t["rows"]) for t in tables]
    text = "\n\n".join(parts)
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in (notes if isinstance(notes, list) else [notes]))
    return text


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def render_data_free(data: dict[str, Any]) -> str:
    """Top-1 (%) per prune ratio and bits, l1 / l2 criterion, for each compensation variant."""
    cells: dict[tuple[float, int], dict[str, dict[str, float]]] = {}
    for r in data["records"]:
        cells.setdefault((r["prune_ratio"], r["bits"]), {}).setdefault(r["method"], {})[r["criterion"]] = r["top1"]
    methods = ["plain", "one_to_one", "udfc_printed", "udfc"]
    rows = []
    for (ratio, bits), by_method in sorted(cells.items()):
        row: list[Any] = [f"{ratio:.0%}", bits]
        for method in methods:
            pair = by_method.get(method, {})
            row.append(" / ".join(_pct(pair.get(c)) for c in ("l1", "l2") if c in pair) or "–")
        rows.append(row)
    columns = ["prune", "bits", "plain pruning", "one-to-one (Neuron Merging)", "UDFC as printed", "UDFC (ours)"]
    head = (
        f"Fashion-MNIST ResNet, top-1 % (l1 / l2 criterion) on {data['n_test']} test images; "
        f"fp32 {_pct(data['fp32_top1'])}%."
    )
    return head + "\n\n" + markdown_table(columns, rows) + "\n\n" + _render_data_free_folded(data)


def _render_data_free_folded(data: dict[str, Any]) -> str:
    """The BN-folded ONNX rows: no BatchNorm statistics left, UDFC's bias correction uses the folded-BN prior."""
    cells: dict[tuple[float, int], dict[str, dict[str, float]]] = {}
    for r in data.get("bn_folded_onnx_records", []):
        cells.setdefault((r["prune_ratio"], r["bits"]), {}).setdefault(r["method"], {})[r["criterion"]] = r["top1"]
    rows = []
    for (ratio, bits), by_method in sorted(cells.items()):
        row: list[Any] = [f"{ratio:.0%}", bits]
        for method in ("plain", "one_to_one", "udfc_printed", "udfc"):
            pair = by_method.get(method, {})
            row.append(" / ".join(_pct(pair.get(c)) for c in ("l1", "l2") if c in pair) or "–")
        rows.append(row)
    columns = ["prune", "bits", "plain pruning", "one-to-one (Neuron Merging)", "UDFC as printed", "UDFC (ours)"]
    head = (
        "The same ResNet exported to ONNX in eval mode (BatchNorm folded into the convs, as an ONNX upload is): "
        "no BN statistics remain, so UDFC (ours) takes its bias correction from a data-free prior "
        "(pre-activation ~ N(0, ‖ŵ‖²), layer mean spread capped at 1)."
    )
    return head + "\n\n" + markdown_table(columns, rows)


def render_mixed_precision(data: dict[str, Any]) -> str:
    rows = []
    for model, entry in data["models"].items():
        metric = entry["metric"]
        for quantizer, run in entry["runs"].items():
            uniform = run["uniform"]
            for budget, point in run["ours"].items():
                ours = point["eval"][metric]
                bracket = "; ".join(
                    f"u{bits} {uniform[bits][metric]:.4g}"
                    for bits in sorted(uniform)
                    if abs(int(bits) - float(budget)) <= 0.5
                )
                rows.append(
                    [
                        model,
                        quantizer,
                        budget,
                        point["avg_bits"],
                        ours,
                        bracket,
                        point["predicted"]["sqnr_db"],
                        point["measured"]["sqnr_db"],
                    ]
                )
    columns = [
        "model",
        "quantizer",
        "budget bits",
        "ours avg bits",
        "ours metric",
        "uniform at nearest widths",
        "predicted SQNR dB",
        "measured SQNR dB",
    ]
    return "Metric: top-1 for the ResNet, embedding cosine for MiniLM.\n\n" + markdown_table(columns, rows)


def render_pruning(data: dict[str, Any]) -> str:
    resnet, minilm = data["fmnist_resnet"], data["minilm"]
    rows = [
        [
            f"{r['target_flops_reduction']:.0%}",
            _pct(r["magnitude_none"]["top1"]),
            _pct(r["ours_none"]["top1"]),
            _pct(r["ours_bn"]["top1"]),
            _pct(r["ours_distill"]["top1"]),
            r["latency"]["speedup_b1"],
            r["latency"]["speedup_b64"],
        ]
        for r in resnet["rows"]
    ]
    cnn = markdown_table(
        [
            "FLOPs cut",
            "L1 magnitude, no recovery",
            "ours, no recovery",
            "ours + BN recal",
            "ours + distill",
            "ORT speedup b1",
            "ORT speedup b64",
        ],
        rows,
    )
    rows = [
        [
            f"{r['heads_and_neurons_removed']:.0%}",
            *(
                f"{r[k]['cosine_mean']:.3f} / {r[k]['lee50_pearson']:.3f}"
                for k in ("magnitude_none", "ours_none", "ours_distill")
            ),
        ]
        for r in minilm["rows"]
    ]
    encoder = markdown_table(
        ["heads + MLP removed", "L1, no recovery (cosine / Lee-50 r)", "ours", "ours + distill"], rows
    )
    head = f"Fashion-MNIST ResNet top-1 % (fp32 {_pct(resnet['fp32_top1'])}%) and measured ONNX Runtime speedup:"
    tail = f"all-MiniLM-L6-v2 (Lee-50 Pearson fp32 {minilm['lee50_pearson_fp32']:.3f}):"
    return f"{head}\n\n{cnn}\n\n{tail}\n\n{encoder}"


def render_verdict(data: dict[str, Any]) -> str:
    """One section per part of benchmarks/verdict.py (latency; reported vs re-measured metrics), then the notes."""
    blocks = []
    latency = data.get("latency")
    if latency:
        overlap = ", ".join(f"batch {b}: {'yes' if ok else 'no'}" for b, ok in latency["intervals_overlap"].items())
        job = json.dumps(latency["job"])
        head = f"Speedup of the same job run {data['runs']} times (`{job}`); intervals overlap: {overlap}."
        blocks.append(head + "\n\n" + markdown_table(latency["table"]["columns"], latency["table"]["rows"]))
    for name, section in data.items():
        if name != "latency" and isinstance(section, dict) and section.get("table"):
            head = f"{section['head']}\n\n" if section.get("head") else ""
            blocks.append(head + markdown_table(section["table"]["columns"], section["table"]["rows"]))
    blocks += ["\n".join(f"- {note}" for note in data["notes"])] if data.get("notes") else []
    return "\n\n".join(blocks) or "_no table in results_"


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "service": render_service,
    "data_free": render_data_free,
    "mixed_precision": render_mixed_precision,
    "pruning": render_pruning,
    "verdict": render_verdict,
}


def render_all(readme: str) -> str:
    for path in sorted(RESULTS.glob("*.json")):
        name = path.stem
        data = json.loads(path.read_text())
        body = RENDERERS.get(name, render_generic)(data)
        pattern = re.compile(rf"(<!-- bench:{name}:start -->\n).*?(\n<!-- bench:{name}:end -->)", re.S)
        readme = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), readme)
    return readme


def main() -> None:
    README.write_text(render_all(README.read_text()))
    print(f"README tables regenerated from {len(list(RESULTS.glob('*.json')))} result files")


if __name__ == "__main__":
    main()

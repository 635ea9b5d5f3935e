"""`modelpress compress`: what a CI pipeline calls. Exit codes are the contract:

0 gate passed (or no gate), 1 gate failed, 2 job failed or cancelled, 3 usage or configuration
error, 4 server unreachable or timed out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from app.client.api import (
    EXIT_GATE_FAILED,
    EXIT_JOB_FAILED,
    EXIT_PASS,
    Client,
    ClientError,
    file_sha256,
)


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    compress = sub.add_parser("compress", help="upload, compress, wait, download, gate (for CI)")
    compress.add_argument("model", type=Path, help="ONNX file, .pt2 archive, or Hugging Face directory/zip")
    compress.add_argument("--method", required=True)
    compress.add_argument("--config", default="{}", help="JSON text or a path to a JSON file")
    compress.add_argument("--calibration", type=Path)
    compress.add_argument("--evaluation", type=Path)
    compress.add_argument("--gate", default=None, help="gate as JSON text or a JSON file")
    compress.add_argument("--max-metric-drop", type=float)
    compress.add_argument("--drop-is-relative", action="store_true")
    compress.add_argument("--min-speedup", type=float)
    compress.add_argument("--max-size-bytes", type=int)
    compress.add_argument("--wait", action="store_true", help="wait for the job and apply the gate")
    compress.add_argument("--timeout", type=float, default=3600.0)
    compress.add_argument("--out", type=Path, default=Path("modelpress-out"))
    compress.add_argument("--url", default=None, help="default: $MODELPRESS_URL")
    compress.add_argument("--api-key", default=None, help="default: $MODELPRESS_API_KEY")
    compress.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    compress.set_defaults(func=cmd_compress)


def _json_arg(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    path = Path(text)
    try:
        raw = path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text
        value = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ClientError(f"not JSON or a JSON file: {text!r} ({exc})") from exc
    if not isinstance(value, dict):
        raise ClientError(f"expected a JSON object: {text!r}")
    return value


def gate_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    gate = _json_arg(args.gate)
    for key in ("max_metric_drop", "min_speedup", "max_size_bytes"):
        if getattr(args, key) is not None:
            gate[key] = getattr(args, key)
    if args.drop_is_relative:
        gate["drop_is_relative"] = True
    return gate or None


def idempotency_key(parts: list[Any]) -> str:
    """Same inputs, same key: a retried CI step finds its job instead of running it twice."""
    return "cli-" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


def cmd_compress(args: argparse.Namespace) -> int:
    try:
        return _compress(args)
    except ClientError as exc:
        print(f"modelpress: {exc}", file=sys.stderr)
        return exc.exit_code


def _compress(args: argparse.Namespace) -> int:
    config, gate = _json_arg(args.config), gate_from_args(args)
    if not args.model.exists():
        raise ClientError(f"model not found: {args.model}")
    client = Client(args.url, args.api_key)
    model = client.upload("models", args.model)
    reused = ", already on server" if model["reused"] else ""
    _log(f"model {model['id']} ({model['format']}, {model['size_bytes']} bytes{reused})")
    body: dict[str, Any] = {"model_id": model["id"], "method": args.method, "config": config}
    for role in ("calibration", "evaluation"):
        path = getattr(args, role)
        if path is not None:
            dataset = client.upload("datasets", path, model_id=model["id"])
            body[f"{role}_id"] = dataset["id"]
            _log(f"{role} data {dataset['id']} ({dataset['kind']})")
    if gate:
        body["gate"] = gate
    key = idempotency_key(
        [
            model["sha256"],
            body.get("calibration_id"),
            body.get("evaluation_id"),
            args.method,
            config,
            gate,
            _digest_or_none(args.calibration),
        ]
    )
    job = client.create_job(body, idempotency_key=key)
    _log(f"job {job['id']} {job['status']}")
    if not args.wait:
        print(json.dumps({"job_id": job["id"], "status": job["status"]}))
        return EXIT_PASS
    job = client.wait(job["id"], timeout_s=args.timeout, on_update=_progress_printer(args.no_progress))
    return _conclude(client, job, args.out)


def _digest_or_none(path: Path | None) -> str | None:
    return file_sha256(path) if path is not None and path.is_file() else None


def _log(message: str) -> None:
    print(f"modelpress: {message}", file=sys.stderr, flush=True)


def _progress_printer(plain: bool) -> Any:
    use_bar = sys.stderr.isatty() and not plain
    state: dict[str, Any] = {"last": None, "bar": None}

    def update(job: dict[str, Any]) -> None:
        line = (job["status"], job.get("stage"), round(job.get("progress") or 0, 2))
        if use_bar:
            from tqdm import tqdm

            bar = state["bar"] or tqdm(total=100, file=sys.stderr, unit="%")
            state["bar"] = bar
            bar.set_description(f"{job['status']}:{job.get('stage')}")
            bar.update(int(100 * (job.get("progress") or 0)) - bar.n)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                bar.close()
        elif line != state["last"]:
            _log(f"{job['status']} stage={job.get('stage')} progress={line[2]:.0%} {job.get('message') or ''}")
        state["last"] = line

    return update


def _conclude(client: Client, job: dict[str, Any], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        write_junit(out / "junit.xml", job, [], failure=f"{error.get('code')}: {error.get('message')}")
        _log(f"job {job['status']}: {error.get('code')}: {error.get('message')}")
        return EXIT_JOB_FAILED
    report = client.report(job["id"])
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for artifact in job["artifacts"]:
        client.download(artifact, out / "artifacts")
    checks = (report.get("gate") or {}).get("checks", [])
    write_junit(out / "junit.xml", job, checks)
    print(summary_table(report, job), flush=True)
    return EXIT_GATE_FAILED if job.get("verdict") == "fail" else EXIT_PASS


def summary_table(report: dict[str, Any], job: dict[str, Any]) -> str:
    original, compressed = report.get("original", {}), report.get("compressed", {})
    rows = [f"{'':18}{'original':>16}{'compressed':>16}"]
    for key in sorted(set(original) & set(compressed)):
        a, b = original[key], compressed[key]
        if isinstance(a, int | float) and isinstance(b, int | float):
            rows.append(f"{key:18}{a:>16.6g}{b:>16.6g}")
    rows.append(f"verdict: {job.get('verdict') or 'no gate'}")
    for check in (report.get("gate") or {}).get("checks", []):
        mark = "PASS" if check["passed"] else "FAIL"
        rows.append(f"  [{mark}] {check['name']}: measured {check['measured']} limit {check['limit']}")
    return "\n".join(rows)


def write_junit(path: Path, job: dict[str, Any], checks: list[dict[str, Any]], failure: str | None = None) -> None:
    """One testcase per gate check (or one for the job itself when it did not succeed)."""
    suite = ET.Element("testsuite", name=f"modelpress.{job['method']}", tests=str(max(len(checks), 1)))
    failures = 0
    if failure is not None:
        case = ET.SubElement(suite, "testcase", classname="modelpress.job", name=job["id"])
        ET.SubElement(case, "error", message=failure).text = failure
        suite.set("errors", "1")
    for check in checks:
        case = ET.SubElement(suite, "testcase", classname="modelpress.gate", name=check["name"])
        if not check["passed"]:
            failures += 1
            message = f"measured {check['measured']} violates limit {check['limit']}"
            ET.SubElement(case, "failure", message=message).text = message
    suite.set("failures", str(failures))
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)

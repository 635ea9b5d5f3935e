"""`modelpress compress`: what a CI pipeline calls. Exit codes are the contract:

0 gate passed (or no gate), 1 gate failed, 2 job failed or cancelled, 3 usage or configuration
error, 4 server unreachable or timed out, 5 inconclusive (no evaluation data: nothing to judge the
model on, never a pass), 130 interrupted (Ctrl-C; the job goes on on the server and
`modelpress wait JOB_ID` reattaches to it).

The method, config and gate are checked by the server before anything is uploaded. A rerun of the
same command finds its job by idempotency key (a retried CI step does not run it twice) unless that
job failed or was cancelled: then it runs again. `--new` always starts a new job.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from app.client.api import (
    EXIT_GATE_FAILED,
    EXIT_INCONCLUSIVE,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_PASS,
    Client,
    ClientError,
    WaitTimeout,
    fetch_methods,
    file_sha256,
)
from app.core.report_view import (
    effective_bits,
    latency_rows,
    megabytes,
    metric_view,
    report_notes,
    signed,
    size_ratio,
    speedup_text,
)
from compression.method_docs import method_catalog, render_text


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    compress = sub.add_parser(
        "compress",
        help="upload, compress, wait, download, gate (for CI)",
        description="Exit codes: 0 gate passed (or no gate), 1 gate failed, 2 job failed or cancelled, "
        "3 usage or configuration error, 4 server unreachable or timed out, 5 inconclusive (no "
        "evaluation data: nothing to judge), 130 interrupted.",
    )
    compress.add_argument("model", type=Path, help="ONNX file, .pt2 archive, or Hugging Face directory/zip")
    compress.add_argument("--method", required=True)
    compress.add_argument("--config", default="{}", help="JSON text or a path to a JSON file")
    compress.add_argument("--calibration", type=Path, help="one dataset alone is split: see report.data.split")
    compress.add_argument("--evaluation", type=Path, help="held-out data the gate judges on (none: exit 5)")
    compress.add_argument("--gate", default=None, help="gate as JSON text or a JSON file")
    compress.add_argument("--max-metric-drop", type=float)
    compress.add_argument("--drop-is-relative", action="store_true")
    compress.add_argument("--min-recovery", type=float, help="compressed / original metric, at least")
    compress.add_argument("--min-speedup", type=float)
    compress.add_argument("--max-size-bytes", type=int)
    compress.add_argument("--wait", action="store_true", help="wait for the job and apply the gate")
    compress.add_argument("--new", action="store_true", help="a new job even if this exact request has one")
    _add_wait_options(compress)
    compress.set_defaults(func=cmd_compress)
    wait = sub.add_parser("wait", help="reattach to a job: wait, download, gate (exit codes as compress)")
    wait.add_argument("job_id")
    _add_wait_options(wait)
    wait.set_defaults(func=cmd_wait)
    methods = sub.add_parser("methods", help="each method: the data it needs, its config keys, an example")
    methods.add_argument("name", nargs="?", help="one method (default: all)")
    methods.add_argument("--url", default=None, help="ask this server (GET /v1/methods); default: this installation")
    methods.add_argument("--json", action="store_true", help="the catalog as JSON, config schemas included")
    methods.set_defaults(func=cmd_methods)


def _add_wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=Path("modelpress-out"))
    parser.add_argument("--url", default=None, help="default: $MODELPRESS_URL")
    parser.add_argument("--api-key", default=None, help="default: $MODELPRESS_API_KEY")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")


def _json_arg(text: str | None, option: str) -> dict[str, Any]:
    """A JSON object given inline or as the path of a file holding one."""
    if not text:
        return {}
    raw = _json_source(text, option)
    try:
        value = json.loads(raw)
    except ValueError as exc:
        where = f" in {text}" if raw is not text else ""
        raise ClientError(f"{option}: not valid JSON{where} ({exc})") from exc
    if not isinstance(value, dict):
        raise ClientError(f"{option}: expected a JSON object, got {text!r}")
    return value


def _json_source(text: str, option: str) -> str:
    if text.lstrip().startswith(("{", "[")):
        return text
    path = Path(text)
    if path.is_file():
        try:
            return path.read_text()
        except OSError as exc:
            raise ClientError(f"{option}: cannot read {text}: {exc}") from exc
    try:
        json.loads(text)
    except ValueError:
        raise ClientError(f"{option}: file {text} does not exist (give a JSON object or a JSON file)") from None
    return text


def gate_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    gate = _json_arg(args.gate, "--gate")
    for key in ("max_metric_drop", "min_recovery", "min_speedup", "max_size_bytes"):
        if getattr(args, key, None) is not None:
            gate[key] = getattr(args, key)
    if args.drop_is_relative:
        gate["drop_is_relative"] = True
    return gate or None


def idempotency_key(parts: list[Any]) -> str:
    """Same inputs, same key: a retried CI step finds its job instead of running it twice."""
    return "cli-" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


def cmd_compress(args: argparse.Namespace) -> int:
    return _guarded(_compress, args)


def cmd_wait(args: argparse.Namespace) -> int:
    return _guarded(lambda a: _attach(Client(a.url, a.api_key), a.job_id, a), args)


def cmd_methods(args: argparse.Namespace) -> int:
    return _guarded(_methods, args)


def _methods(args: argparse.Namespace) -> int:
    catalog = fetch_methods(args.url) if args.url else method_catalog()
    chosen = [entry for entry in catalog if args.name in (None, entry["key"])]
    if not chosen:
        valid = ", ".join(entry["key"] for entry in catalog)
        raise ClientError(f"unknown_method: unknown method {args.name!r}\n  valid: {valid}")
    print(json.dumps(chosen, indent=2) if args.json else "\n\n".join(render_text(entry) for entry in chosen))
    return EXIT_PASS


def _guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return command(args)
    except ClientError as exc:
        print(f"modelpress: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _log("interrupted before waiting on a job; the same command goes on from where it stopped")
        return EXIT_INTERRUPTED


def _check_inputs(args: argparse.Namespace) -> None:
    for what, path in (
        ("model", args.model),
        ("calibration data", args.calibration),
        ("evaluation data", args.evaluation),
    ):
        if path is not None and not path.exists():
            raise ClientError(f"{what} not found: {path}")


def _compress(args: argparse.Namespace) -> int:
    config, gate = _json_arg(args.config, "--config"), gate_from_args(args)
    _check_inputs(args)
    client = Client(args.url, args.api_key)
    client.validate_method(args.method, config, gate)
    model, body = _upload_inputs(client, args, config)
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
    if args.new:
        key = f"{key}-{uuid.uuid4().hex}"
    job = client.create_job(body, idempotency_key=key)
    _log(f"job {job['id']} {job['status']}")
    if not args.wait:
        print(json.dumps({"job_id": job["id"], "status": job["status"]}))
        return EXIT_PASS
    return _attach(client, job["id"], args)


def _upload_inputs(
    client: Client, args: argparse.Namespace, config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Upload (or find) the model and data; returns the model and the job body naming them."""
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
    return model, body


def _attach(client: Client, job_id: str, args: argparse.Namespace) -> int:
    """Wait for the job, then download and gate; Ctrl-C or a timeout leave it running and say how to return."""
    try:
        job = client.wait(job_id, timeout_s=args.timeout, on_update=_progress_printer(args.no_progress))
        return _conclude(client, job, args.out)
    except KeyboardInterrupt:
        _log(f"interrupted: job {job_id} goes on on the server; reattach with\n  {reattach_command(job_id, args)}")
        return EXIT_INTERRUPTED
    except WaitTimeout as exc:
        raise WaitTimeout(
            f"{exc}; it goes on on the server; reattach with\n  {reattach_command(job_id, args)}"
        ) from exc


def reattach_command(job_id: str, args: argparse.Namespace) -> str:
    """The `modelpress wait` line for this job with this command's options (never the API key)."""
    words = ["modelpress", "wait", job_id, "--out", str(args.out), "--timeout", f"{args.timeout:g}"]
    if args.url:
        words += ["--url", args.url]
    if args.no_progress:
        words.append("--no-progress")
    return shlex.join(words)


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
    return VERDICT_EXIT_CODES.get(job.get("verdict"), EXIT_PASS)


VERDICT_EXIT_CODES = {"fail": EXIT_GATE_FAILED, "inconclusive": EXIT_INCONCLUSIVE}
INCONCLUSIVE_MESSAGE = "inconclusive: no evaluation data, so nothing to judge the model on"


def summary_table(report: dict[str, Any], job: dict[str, Any]) -> str:
    """What a CI log shows: the metric by name, sizes in MB, latency in ms with the speedup and its interval,
    signed changes, the verdict with each check, and every note in the report."""
    model = job.get("model_filename") or job.get("model_id")
    rows = [f"job {job['id']}: {job['method']} on {model} ({(report.get('model') or {}).get('format', '?')})"]
    rows += _metric_rows(report) + _size_rows(report) + _latency_rows(report)
    verdict = job.get("verdict")
    rows.append(f"verdict: {INCONCLUSIVE_MESSAGE if verdict == 'inconclusive' else verdict or 'no gate'}")
    for check in (report.get("gate") or {}).get("checks", []):
        mark = "PASS" if check["passed"] else "FAIL"
        unit = f" {check['unit']}" if check.get("unit") else ""
        rows.append(
            f"  [{mark}] {check['name']}: measured {_num(check['measured'])}{unit}, limit {_num(check['limit'])}"
        )
    rows.extend(f"note: {note}" for note in report_notes(report))
    return "\n".join(rows)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metric_rows(report: dict[str, Any]) -> list[str]:
    metric = metric_view(report)
    if metric is None:
        return ["metric: not measured (no labelled or scored evaluation data)"]
    if metric["synthetic"]:
        return [f"metric: not measured (no evaluation data; {metric['name']} on synthetic inputs judges nothing)"]
    change = "worse" if metric["worse"] else "not worse"
    line = (
        f"{metric['name']}: {metric['original']:.4g} -> {metric['compressed']:.4g} "
        f"(change {signed(metric['delta'])}, {change})"
    )
    if metric["drop_ci95"]:
        low, high = metric["drop_ci95"]
        line += f"; drop {signed(metric['drop'])}, 95% interval {signed(low)} to {signed(high)}"
    return [line]


def _size_rows(report: dict[str, Any]) -> list[str]:
    original, compressed = report.get("original") or {}, report.get("compressed") or {}
    ratio = size_ratio(report)
    line = f"size: {megabytes(original.get('size_bytes'))} -> {megabytes(compressed.get('size_bytes'))}"
    if ratio is not None:
        line += f" ({ratio:.3g}x, {signed(100 * (ratio - 1), 3)}%)"
    bits = effective_bits(report)
    rows = [line]
    if bits is not None:
        rows.append(f"effective bits per quantized weight: {bits:.3g} (scales and zeros included)")
    if isinstance(original.get("params"), int) and isinstance(compressed.get("params"), int):
        delta = compressed["params"] - original["params"]
        rows.append(f"params: {original['params']:,} -> {compressed['params']:,} ({delta:+,})")
    return rows


def _latency_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for row in latency_rows(report):
        rows.append(
            f"latency batch {row['batch']}: {_ms(row['original_ms'])} -> {_ms(row['compressed_ms'])} median "
            f"(p95 {_ms(row['original_p95_ms'])} -> {_ms(row['compressed_p95_ms'])}), speedup {speedup_text(row)}"
        )
    return rows or ["latency: not measured"]


def _ms(value: Any) -> str:
    return f"{value:.3g} ms" if isinstance(value, int | float) else "n/a"


def write_junit(path: Path, job: dict[str, Any], checks: list[dict[str, Any]], failure: str | None = None) -> None:
    """One testcase per gate check, plus one error for the job when it did not succeed or was inconclusive.

    An inconclusive job's checks are skipped: measured on synthetic inputs, they say nothing.
    """
    inconclusive = failure is None and job.get("verdict") == "inconclusive"
    failure = INCONCLUSIVE_MESSAGE if inconclusive else failure
    tests = len(checks) + (1 if failure is not None else 0)
    suite = ET.Element("testsuite", name=f"modelpress.{job['method']}", tests=str(max(tests, 1)))
    failures = 0
    if failure is not None:
        case = ET.SubElement(suite, "testcase", classname="modelpress.job", name=job["id"])
        ET.SubElement(case, "error", message=failure).text = failure
        suite.set("errors", "1")
    for check in checks:
        case = ET.SubElement(suite, "testcase", classname="modelpress.gate", name=check["name"])
        if inconclusive:
            ET.SubElement(case, "skipped", message=INCONCLUSIVE_MESSAGE)
        elif not check["passed"]:
            failures += 1
            message = f"measured {check['measured']} violates limit {check['limit']}"
            ET.SubElement(case, "failure", message=message).text = message
    suite.set("failures", str(failures))
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)

"""`modelpress` command line: serve, worker, migrate, janitor, admin, demo (and the client commands)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.core.settings import Settings

# The directory holding the packages: the checkout in development (tests and benchmarks run from it),
# site-packages once installed. Nothing at runtime may depend on it.
ROOT = Path(__file__).resolve().parent.parent
QUEUES_HELP = "queues to consume, comma-separated: gpu, cpu (default: MODELPRESS_WORKER_QUEUES, gpu,cpu)"


def migrate(url: str | None = None) -> None:
    """alembic upgrade head on the configured database (SQLite file created on first use)."""
    from app.core.settings import get_settings
    from app.db.schema import upgrade_to_head

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(url or settings.resolved_database_url)


def worker_command(
    queues: str | None = None, concurrency: int = 1, name: str | None = None, *, max_tasks_per_child: int | None = None
) -> list[str]:
    """The Celery worker command line; queues default to MODELPRESS_WORKER_QUEUES. Without an explicit
    max_tasks_per_child the worker picks it from its settings and device (workers/device.py)."""
    from app.core.settings import get_settings

    command = [
        sys.executable,
        "-P",  # the installed packages, never an `app/` or `workers/` folder in the working directory
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "-Q",
        queues or get_settings().worker_queues,
        "--pool",
        "prefork",
        "-c",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    if name:
        command += ["-n", name]
    if max_tasks_per_child is not None:
        command += ["--max-tasks-per-child", str(max_tasks_per_child)]
    return command


class WorkerSupervisor:
    """Keeps local worker processes alive for `modelpress serve`: a crashed one is restarted, and so is one
    whose consumer loop stopped reporting progress (its alive file, workers/liveness.py, went stale)."""

    def __init__(self, count: int, queues: str | None, *, run_dir: Path, stall_after_s: float) -> None:
        self.count, self.queues = count, queues
        self.run_dir, self.stall_after_s = run_dir, stall_after_s
        self.processes: list[subprocess.Popen[bytes]] = []
        self.spawned_at: dict[int, float] = {}
        self.stop = threading.Event()

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.processes = [self._spawn(i) for i in range(self.count)]
        threading.Thread(target=self._watch, daemon=True, name="worker-supervisor").start()

    def alive_file(self, index: int) -> Path:
        return self.run_dir / f"worker-{index}.alive"

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        from app.core.queue import WORKER_ALIVE_FILE_ENV

        self.alive_file(index).unlink(missing_ok=True)
        self.spawned_at[index] = time.time()
        command = worker_command(self.queues, 1, f"embedded{index}@%h")
        # The working directory and environment of `serve` itself: its settings were pinned there already.
        env = {**os.environ, WORKER_ALIVE_FILE_ENV: str(self.alive_file(index))}
        return subprocess.Popen(command, env=env, preexec_fn=_terminate_with_parent)

    def _watch(self) -> None:
        while not self.stop.wait(2.0):
            for index, process in enumerate(self.processes):
                if process.poll() is not None:
                    logging.warning("worker %d exited with %s; restarting", index, process.returncode)
                elif (silent_s := self.silent_for(index)) > self.stall_after_s:
                    logging.warning("worker %d reported no progress for %.0f s; restarting it", index, silent_s)
                    _stop_worker(process)
                else:
                    continue
                if not self.stop.is_set():
                    self.processes[index] = self._spawn(index)

    def silent_for(self, index: int) -> float:
        """Seconds since the worker's last beat; a starting worker gets WORKER_START_GRACE_S for its first."""
        try:
            last = self.alive_file(index).stat().st_mtime
        except FileNotFoundError:
            last = self.spawned_at[index] + WORKER_START_GRACE_S
        return time.time() - last

    def shutdown(self) -> None:
        self.stop.set()
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


WORKER_START_GRACE_S = 60.0
WORKER_STOP_GRACE_S = 10.0


def _stop_worker(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (Celery restores the messages it holds to the broker), SIGKILL if it does not end in time;
    its pool processes die with it (Celery sets their parent-death signal)."""
    process.terminate()
    try:
        process.wait(timeout=WORKER_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _terminate_with_parent() -> None:
    """In a supervised worker, before exec: SIGTERM when `serve` dies, even by SIGKILL (Linux)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def cmd_serve(args: argparse.Namespace) -> int:
    from app.core.janitor import start_janitor_thread

    settings = _pin_serve_settings()
    migrate()
    supervisor = None
    if args.workers > 0:
        run_dir = settings.data_dir / "run"
        supervisor = WorkerSupervisor(
            args.workers, args.queues, run_dir=run_dir, stall_after_s=settings.worker_stall_after_s
        )
    if supervisor:
        supervisor.start()
    stop_janitor = threading.Event()
    if settings.janitor_enabled:
        start_janitor_thread(stop_janitor)
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default handler that
    # ended the process before the `finally` below, leaving the workers orphaned and still consuming.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _run_api(args.host, args.port, args.api_workers)
    finally:
        stop_janitor.set()
        if supervisor:
            supervisor.shutdown()
    return 0


def _pin_serve_settings() -> Settings:
    """Reads the user's settings once, here, and hands them to every child through the environment: the
    data dir as an absolute path (a child that resolved `var` itself used another database), and the
    janitor off in the API processes, since `serve` runs the one janitor itself however many there are."""
    from app.core.settings import Settings, get_settings

    settings = Settings()
    os.environ["MODELPRESS_DATA_DIR"] = str(settings.data_dir)
    os.environ["MODELPRESS_JANITOR_ENABLED"] = "false"
    get_settings.cache_clear()  # this process hosts an API process too: it reads the pinned values
    return settings


def _run_api(host: str, port: int, processes: int) -> None:
    import uvicorn

    if processes == 1:
        uvicorn.run("app.main:app", host=host, port=port, log_level="info")
        return
    os.environ["MODELPRESS_SERVE_PID"] = str(os.getpid())  # read by api_process_app in each API process
    uvicorn.run("app.cli:api_process_app", factory=True, host=host, port=port, workers=processes, log_level="info")


def api_process_app() -> FastAPI:
    """The app of one of `serve --api-workers N`'s processes (uvicorn's); it ends with `serve`, even killed."""
    from app.main import create_app

    _terminate_with_parent()
    # the parent-death signal only covers a death after it is set: `serve` killed while this process was
    # still importing has already re-parented it
    if os.environ.get("MODELPRESS_SERVE_PID") not in (None, str(os.getppid())):
        raise SystemExit("serve ended before this API process started")
    return create_app()


def cmd_worker(args: argparse.Namespace) -> int:
    if args.device:
        os.environ["MODELPRESS_WORKER_DEVICE"] = args.device
    command = worker_command(args.queues, args.concurrency, max_tasks_per_child=args.max_tasks_per_child)
    os.execv(sys.executable, command)
    return 0  # pragma: no cover


def cmd_migrate(_: argparse.Namespace) -> int:
    migrate()
    print("database at head")
    return 0


def cmd_janitor(args: argparse.Namespace) -> int:
    from app.core.janitor import run_janitor_once
    from app.core.settings import get_settings

    while True:
        print(run_janitor_once(), flush=True)
        if args.once:
            return 0
        time.sleep(get_settings().janitor_interval_s)


def cmd_create_key(args: argparse.Namespace) -> int:
    from app.db import crud
    from app.db.session import session_scope

    migrate()
    with session_scope() as session:
        project = crud.get_or_create_project(session=session, name=args.project)
        key = crud.create_api_key(session=session, project=project)
    print(key)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from app.client.demo import run_demo

    return run_demo(method=args.method, config_json=args.config, port=args.port)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _queues(text: str) -> str:
    from app.core.queue import parse_queues

    try:
        return ",".join(parse_queues(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="API + local workers (embedded default: SQLite, local store)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="local worker processes to supervise (0: none)")
    serve.add_argument("--queues", type=_queues, default=None, help=QUEUES_HELP)
    serve.add_argument(
        "--api-workers", type=_positive_int, default=1, help="API processes (uvicorn workers) sharing the port"
    )
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="a Celery worker process")
    worker.add_argument("--queues", type=_queues, default=None, help=QUEUES_HELP)
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=None, help="default: MODELPRESS_WORKER_DEVICE (auto)"
    )
    worker.add_argument(
        "--max-tasks-per-child",
        type=int,
        default=None,
        help="jobs a pool process runs before it is replaced (default: MODELPRESS_WORKER_MAX_TASKS_PER_CHILD; "
        "unset: 1 on CUDA, no limit on CPU)",
    )
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="alembic upgrade head").set_defaults(func=cmd_migrate)
    janitor = sub.add_parser("janitor", help="reap dead workers' jobs, re-send lost messages")
    janitor.add_argument("--once", action="store_true")
    janitor.set_defaults(func=cmd_janitor)
    admin = sub.add_parser("admin", help="administration").add_subparsers(dest="admin", required=True)
    create_key = admin.add_parser("create-key", help="print a new API key for a project (created if new)")
    create_key.add_argument("--project", required=True)
    create_key.set_defaults(func=cmd_create_key)
    demo = sub.add_parser("demo", help="end to end on the embedded default: build, upload, compress, report")
    demo.add_argument("--method", default="quant_decoupleq")
    demo.add_argument("--config", default=None, help="method config as JSON")
    demo.add_argument("--port", type=int, default=8765)
    demo.set_defaults(func=cmd_demo)
    _add_client_commands(sub)
    return parser


def _add_client_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    try:
        from app.client.cli import add_commands
    except ImportError:
        return
    add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

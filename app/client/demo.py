"""`modelpress demo`: the whole product on the embedded default, on a model the project ships.

Builds the Fashion-MNIST ResNet fixture as ONNX plus two disjoint data files (calibration images
from the training split, labelled held-out evaluation images from the test split), starts
`modelpress serve` (SQLite, local store, filesystem broker, one supervised worker), then runs the
same `compress` command a CI pipeline runs: upload, compress, wait with progress, gate, report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

DEMO_DIR = Path("var/demo")


def build_inputs(directory: Path, samples: int = 512) -> tuple[Path, Path, Path]:
    """The fixture model as ONNX, `samples` training images (calibration) and `samples` labelled test
    images (evaluation) as .npz: the gate judges the model on images the method never saw."""
    import numpy as np
    import torch

    from compression.zoo import fmnist_resnet

    directory.mkdir(parents=True, exist_ok=True)
    model_path, data_path = directory / "fmnist_resnet.onnx", directory / "fmnist_test.npz"
    calibration_path = directory / "fmnist_train.npz"
    if not model_path.exists():
        model = fmnist_resnet.load_pretrained().eval()
        example = torch.zeros(1, 1, 28, 28)
        torch.onnx.export(
            model,
            (example,),
            str(model_path),
            input_names=[fmnist_resnet.INPUT_NAME],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    if not data_path.exists():
        images, labels = fmnist_resnet.load_fashion_mnist("test", limit=samples)
        np.savez(data_path, input=images.numpy(), labels=labels.numpy())
    if not calibration_path.exists():
        images = fmnist_resnet.load_fashion_mnist("train", limit=samples)[0]
        np.savez(calibration_path, input=images.numpy())
    return model_path, calibration_path, data_path


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"modelpress serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("modelpress serve did not become ready")


def run_demo(*, method: str, config_json: str | None, port: int) -> int:
    from app.client.cli import cmd_compress

    env = {**os.environ, "MODELPRESS_DATA_DIR": str(DEMO_DIR.resolve() / "server")}
    os.environ.update(env)
    model_path, calibration_path, data_path = build_inputs(DEMO_DIR / "inputs")
    key = (
        subprocess.run(
            [sys.executable, "-m", "app.cli", "admin", "create-key", "--project", "demo"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    url = f"http://127.0.0.1:{port}"
    log = open(DEMO_DIR / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(url, server)
        config = config_json or json.dumps({"bits": 4, "group_size": 64})
        args = argparse.Namespace(
            model=model_path,
            method=method,
            config=config,
            calibration=calibration_path,
            evaluation=data_path,
            gate=None,
            max_metric_drop=0.01,
            drop_is_relative=False,
            min_recovery=None,
            min_speedup=None,
            max_size_bytes=None,
            wait=True,
            new=False,
            timeout=1800.0,
            out=DEMO_DIR / "out",
            url=url,
            api_key=key,
            no_progress=False,
        )
        code = cmd_compress(args)
        print(f"artifacts, report.json and junit.xml in {args.out}; server log in {DEMO_DIR / 'server.log'}")
        jobs = httpx.get(f"{url}/v1/jobs?limit=1", headers={"Authorization": f"Bearer {key}"}).json()["items"]
        if jobs:
            html = httpx.get(f"{url}/v1/jobs/{jobs[0]['id']}/report.html", headers={"Authorization": f"Bearer {key}"})
            (args.out / "report.html").write_text(html.text)
            print(f"HTML report in {args.out / 'report.html'}")
        return code
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

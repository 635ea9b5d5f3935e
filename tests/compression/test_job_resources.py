"""The report's `resources`: each stage's own peak resident memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compression.job import run_job
from compression.pipeline.context import STAGES
from compression.pipeline.resources import StageMemory, status_bytes
from tests.compression.test_job_memory_estimate import _spec


def test_a_stage_peak_is_its_own_not_the_process_lifetime() -> None:
    memory = StageMemory()
    memory.start()
    block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    memory.end("big")
    del block
    memory.start()
    small = np.ones(2**20)
    memory.end("small")
    del small
    section = memory.section()
    big, little = section["stages"]["big"], section["stages"]["small"]
    assert big["peak_rss_bytes"] >= big["end_rss_bytes"] >= 300 * 2**20
    assert section["peak_stage"] == "big" and section["peak_rss_bytes"] == big["peak_rss_bytes"]
    assert status_bytes("VmRSS") > 0
    if not section["basis"].startswith("VmHWM of the job's process, reset"):
        pytest.skip(f"this kernel does not reset the peak per stage: {section['basis']}")
    assert little["peak_rss_bytes"] < big["peak_rss_bytes"] - 250 * 2**20


def test_job_report_has_peak_memory_for_every_stage(tmp_path: Path) -> None:
    report = run_job(_spec(tmp_path, None), progress=lambda *_: None, should_cancel=lambda: False).report
    resources = report["resources"]
    assert set(resources["stages"]) == set(STAGES)
    for entry in resources["stages"].values():
        assert entry["peak_rss_bytes"] >= entry["end_rss_bytes"] > 0
    assert resources["peak_rss_bytes"] == max(e["peak_rss_bytes"] for e in resources["stages"].values())
    assert resources["peak_stage"] in STAGES


def test_released_weights_leave_resident_memory() -> None:
    import torch
    from torch import nn

    from compression.pipeline.resources import release_weights

    bump = torch.ones(5 * 2**20)  # 20 MB: once freed, glibc serves 16 MB blocks from its heap, not mmap
    del bump
    model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(24)])  # 24 x 16 MB, on the heap
    before = status_bytes("VmRSS")
    release_weights(model)
    assert before - status_bytes("VmRSS") > 300 * 2**20
    assert model[0].weight.device.type == "meta" and model[0].weight.shape == (2048, 2048)

"""Make a user's torch.export archive loadable without unpickling anything the user sent.

`torch.export.load` unpickles two things: tensors flagged `use_pickle` (refused here outright) and the
archive's sample inputs (always a pickle). We rewrite the archive with sample inputs of our own, zeros
built from the graph's declared input shapes, so the only pickle that is ever loaded is one we wrote.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from compression.io.errors import ModelLoadError

_DTYPES = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}


def _refuse_pickled_payloads(archive: zipfile.ZipFile) -> None:
    for name in archive.namelist():
        if name.endswith("_config.json") and "/data/" in name:
            entries = json.loads(archive.read(name)).get("config", {})
            pickled = [key for key, entry in entries.items() if entry.get("use_pickle")]
            if pickled:
                raise ModelLoadError("pickle_refused", f"the .pt2 archive stores pickled tensors ({pickled[:3]})")
        if "/data/custom_objects/" in name or name.endswith((".pkl", ".pickle")):
            raise ModelLoadError("pickle_refused", f"the .pt2 archive holds pickled objects ({name})")


def _placeholder_inputs(graph: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    values = graph.get("graph", {}).get("tensor_values", {})
    args = []
    for spec in graph.get("signature", {}).get("input_specs", []):
        tensor = spec.get("user_input", {}).get("arg", {}).get("as_tensor")
        if tensor is None:
            continue
        meta = values.get(tensor["name"], {})
        shape = [int(size.get("as_int", 1)) for size in meta.get("sizes", [])]
        args.append(torch.zeros(shape, dtype=_DTYPES.get(meta.get("dtype"), torch.float32)))
    return tuple(args), {}


def sanitize_pt2(path: Path, out_path: Path) -> Path:
    """A copy of `path` whose sample inputs are ours; raises pickle_refused for pickled payloads."""
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    with zipfile.ZipFile(path) as archive:
        _refuse_pickled_payloads(archive)
    reader = PT2ArchiveReader(str(path))
    names = reader.get_file_names()
    writer = PT2ArchiveWriter(str(out_path))
    try:
        for name in names:
            if "data/sample_inputs/" not in name and not name.startswith(".data/"):
                writer.write_bytes(name, reader.read_bytes(name))
        for name in (n for n in names if n.startswith("models/") and n.endswith(".json")):
            graph = json.loads(reader.read_bytes(name))["graph_module"]
            buffer = io.BytesIO()
            torch.save(_placeholder_inputs(graph), buffer)
            writer.write_bytes(f"data/sample_inputs/{Path(name).stem}.pt", buffer.getvalue())
    finally:
        writer.close()
    return out_path

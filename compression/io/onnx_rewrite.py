"""ONNX subgraphs for quantized weights.

- `matmul_nbits_nodes`: Linear (Gemm/MatMul) at 2, 4 or 8 bits -> `com.microsoft.MatMulNBits` on
  unsigned codes u = codes + 2^(b-1), by the layer's zero-point form (`QuantizedLayer.zero_point_kind`):
  symmetric: no zero_points input (ORT's default 2^(b-1)); integer: the packed uint8 `zero_points` input
  (zp + 2^(b-1), b bits each, per row a little-endian bit stream padded to whole bytes: ORT's layout) — both
  take ORT's prepacked kernels; float Z: ORT's default zero point plus the float-Z term
  `Σ_g Z[n,g]·Σ_(k∈g) A[m,k]` (a ReduceSum and a tiny MatMul). At the widths in FLOAT_ZERO_POINT_BITS (2)
  below accuracy_level 4, every form takes float zero points 2^(b-1) − Z/S instead: ORT's 2-bit prepacked
  kernels compute in int8 only, and with fp32 activations they run 10-80x slower than the fp32 MatMul
  where the float-zero-point loop runs ~2x slower (benchmarks/matmul_nbits.py, one token); at level 4 the
  prepacked forms are 2.3-4.4x faster than fp32. Per-channel layers use a block of 16..128 columns with
  each row's S (and zp) repeated over its blocks (exact).
- `dequant_weight_nodes` ("option A", any op, any bits incl. 3): packed uint8 initializer unpacked
  in-graph with float Div/Floor/Mod (opset >= 10), scaled and offset per group, reshaped to the
  original weight layout. ORT constant-folds it at session creation: file small, compute fp32.

ORT 1.32's MatMulNBits refuses bits=3 ("Only 2b, 4b and 8b"), so 3-bit Linear layers use option A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from compression.primitives.pack import pack_codes, padded_length
from compression.types import QuantizedLayer

MATMUL_NBITS_BITS = (2, 4, 8)
# Measured by benchmarks/matmul_nbits.py (ORT 1.32, CPU): at 2 bits with fp32 activations float zero points are
# ORT's faster path; at 4 bits, and at 2 bits with int8 activations, the prepacked forms are (README table).
FLOAT_ZERO_POINT_BITS = (2,)
INT8_ACCURACY_LEVEL = 4  # MatMulNBits quantizes activations to int8 (CPU int8 compute) at this level


@dataclass
class Subgraph:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def nbits_block_size(layer: QuantizedLayer) -> int:
    if layer.group_size:
        return layer.group_size
    cols = layer.codes.shape[1]
    return int(min(128, max(16, 1 << (cols - 1).bit_length())))


def packed_rows(layer: QuantizedLayer, pad_to: int | None) -> np.ndarray:
    """Codes packed per row (compression.primitives.pack layout), K padded to a multiple of `pad_to`."""
    return pack_codes(layer.codes, layer.bits, pad_to).numpy()


def matmul_nbits_nodes(
    layer: QuantizedLayer,
    a_name: str,
    y_name: str,
    prefix: str,
    *,
    accuracy_level: int = 0,
    use_float_zero_points: bool | None = None,
) -> Subgraph:
    """Y = A · dequant(W)ᵀ for W [N, K] = codes·S + Z (bias is the caller's). `use_float_zero_points`: float zero
    points whatever the layer's form (default: at the widths in FLOAT_ZERO_POINT_BITS below INT8_ACCURACY_LEVEL)."""
    n_out, cols = layer.codes.shape
    block = nbits_block_size(layer)
    k_blocks = -(-cols // block)
    if use_float_zero_points is None:  # 2-bit prepacked kernels compute in int8 only
        use_float_zero_points = layer.bits in FLOAT_ZERO_POINT_BITS and accuracy_level < INT8_ACCURACY_LEVEL
    scales, points = _scales_and_zero_points(layer, k_blocks, use_float_zero_points)
    has_zero = layer.zero_point_kind() == "float" and not use_float_zero_points
    packed = packed_rows(layer, block).reshape(n_out, k_blocks, block * layer.bits // 8)
    inits = [_const(f"{prefix}_B", packed), _const(f"{prefix}_scales", scales.numpy())]
    inputs = [a_name, f"{prefix}_B", f"{prefix}_scales", *([f"{prefix}_zero_points"] if points is not None else [])]
    inits += [_const(f"{prefix}_zero_points", points.numpy())] if points is not None else []
    main_out = f"{prefix}_mm" if has_zero else y_name
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        [main_out],
        name=f"{prefix}_MatMulNBits",
        domain="com.microsoft",
        K=cols,
        N=n_out,
        bits=layer.bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    if not has_zero:
        return Subgraph([node], inits)
    zero_term = _zero_correction(layer, a_name, prefix)
    add = helper.make_node("Add", [main_out, f"{prefix}_zterm"], [y_name])
    return Subgraph([node, *zero_term.nodes, add], [*inits, *zero_term.initializers])


def _scales_and_zero_points(
    layer: QuantizedLayer, k_blocks: int, use_float: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MatMulNBits' scales [N, k_blocks] and zero_points input (None: ORT's default 2^(b−1)): float zero points
    when `use_float`, packed uint8 for integer zero points, none for symmetric codes or a float Z (the caller
    adds its correction subgraph)."""
    n_out = layer.codes.shape[0]
    scales = layer.scales.float().expand(n_out, k_blocks) if not layer.group_size else layer.scales.float()
    if use_float:
        return float_zero_points(layer, scales)
    if layer.zero_point_kind() == "integer":
        return scales, packed_zero_points(layer, k_blocks)
    return scales, None


def packed_zero_points(layer: QuantizedLayer, k_blocks: int) -> torch.Tensor:
    """MatMulNBits' uint8 `zero_points` [N·ceil(k_blocks·b/8)]: zp + 2^(b−1) per block, packed like the codes."""
    zero_points = layer.integer_zero_points()
    assert zero_points is not None, f"{layer.name} has no integer zero points"
    if not layer.group_size:
        zero_points = zero_points.expand(-1, k_blocks)
    return pack_codes(zero_points.contiguous(), layer.bits).reshape(-1)


def matmul_nbits_levels(model: onnx.ModelProto) -> set[int]:
    """The accuracy_level values of the graph's MatMulNBits nodes (empty: the graph has none)."""
    return {
        next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
        for node in model.graph.node
        if node.op_type == "MatMulNBits"
    }


def set_accuracy_level(model: onnx.ModelProto, level: int) -> int:
    """Set accuracy_level on every MatMulNBits node in place; returns how many nodes there are."""
    nodes = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
    return len(nodes)


def float_zero_points(layer: QuantizedLayer, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, zp) per block for MatMulNBits' float zero points: (u − zp)·S = codes·S + Z with
    u = codes + 2^(b−1), so zp = 2^(b−1) − Z/S. A zero S (a constant group: Ŵ = Z) becomes 1e-12,
    which keeps (u − zp)·S = Z to float precision."""
    zeros = layer.zeros.float().expand_as(scales)
    safe = torch.where(scales.abs() < 1e-12, torch.full_like(scales, 1e-12), scales)
    return safe, (1 << (layer.bits - 1)) - zeros / safe


def _zero_correction(layer: QuantizedLayer, a_name: str, prefix: str) -> Subgraph:
    """`{prefix}_zterm` [..., N] = Σ_g Z[n, g] · Σ_(k in group g) A[..., k]."""
    zeros = layer.zeros.float().numpy()  # [N, ng]
    cols, groups = layer.codes.shape[1], zeros.shape[1]
    out = f"{prefix}_zterm"
    if groups == 1:
        nodes = [
            helper.make_node("ReduceSum", [a_name, f"{prefix}_axis"], [f"{prefix}_asum"], keepdims=1),
            helper.make_node("Mul", [f"{prefix}_asum", f"{prefix}_zrow"], [out]),
        ]
        return Subgraph(nodes, [_const(f"{prefix}_axis", np.array([-1])), _const(f"{prefix}_zrow", zeros[:, 0])])
    group = layer.group_size or cols
    membership = np.zeros((cols, groups), dtype=np.float32)
    membership[np.arange(cols), np.arange(cols) // group] = 1.0
    nodes = [
        helper.make_node("MatMul", [a_name, f"{prefix}_groups"], [f"{prefix}_gsum"]),
        helper.make_node("MatMul", [f"{prefix}_gsum", f"{prefix}_zT"], [out]),
    ]
    if cols % group == 0:  # reshape-and-sum instead of a [K, ng] membership matrix
        nodes = [
            helper.make_node("Shape", [a_name], [f"{prefix}_ashape"]),
            helper.make_node("Slice", [f"{prefix}_ashape", f"{prefix}_zero", f"{prefix}_m1"], [f"{prefix}_lead"]),
            helper.make_node("Concat", [f"{prefix}_lead", f"{prefix}_gshape"], [f"{prefix}_target"], axis=0),
            helper.make_node("Reshape", [a_name, f"{prefix}_target"], [f"{prefix}_agroups"]),
            helper.make_node("ReduceSum", [f"{prefix}_agroups", f"{prefix}_m1"], [f"{prefix}_gsum"], keepdims=0),
            nodes[1],
        ]
        inits = [
            _const(f"{prefix}_zero", np.array([0])),
            _const(f"{prefix}_m1", np.array([-1])),
            _const(f"{prefix}_gshape", np.array([groups, group])),
        ]
    else:
        inits = [_const(f"{prefix}_groups", membership)]
    return Subgraph(nodes, [*inits, _const(f"{prefix}_zT", np.ascontiguousarray(zeros.T))])


def option_a_layout(layer: QuantizedLayer) -> tuple[int, int, int]:
    """(groups, padded group width, padded columns) of the packed option-A / safetensors storage."""
    cols = layer.codes.shape[1]
    if layer.group_size:
        groups = -(-cols // layer.group_size)
        return groups, layer.group_size, groups * layer.group_size
    padded = padded_length(cols, layer.bits)
    return 1, padded, padded


def _unpack_nodes(packed_name: str, rows: int, padded: int, bits: int, prefix: str) -> Subgraph:
    """uint8 packed [rows, padded*bits/8] -> float codes u [rows, padded] with Div/Floor/Mod only."""
    out = f"{prefix}_u"
    if bits == 8:
        return Subgraph([helper.make_node("Cast", [packed_name], [out], to=onnx.TensorProto.FLOAT)], [])
    chunk_bytes = bits // math.gcd(8, bits)  # 3- and 6-bit: 3 bytes per chunk; below 2^24, exact in fp32
    per_chunk = chunk_bytes * 8 // bits
    chunks = padded // per_chunk
    byte_weights = (256.0 ** np.arange(chunk_bytes)).astype(np.float32).reshape(chunk_bytes, 1)
    divisors = (2.0 ** (bits * np.arange(per_chunk))).astype(np.float32)
    nodes = [
        helper.make_node("Cast", [packed_name], [f"{prefix}_bytes"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Reshape", [f"{prefix}_bytes", f"{prefix}_chunk_shape"], [f"{prefix}_chunks"]),
        helper.make_node("MatMul", [f"{prefix}_chunks", f"{prefix}_byte_w"], [f"{prefix}_words"]),
        helper.make_node("Div", [f"{prefix}_words", f"{prefix}_div"], [f"{prefix}_shifted"]),
        helper.make_node("Floor", [f"{prefix}_shifted"], [f"{prefix}_floor"]),
        helper.make_node("Mod", [f"{prefix}_floor", f"{prefix}_mod"], [f"{prefix}_codes3"], fmod=1),
        helper.make_node("Reshape", [f"{prefix}_codes3", f"{prefix}_u_shape"], [out]),
    ]
    inits = [
        _const(f"{prefix}_chunk_shape", np.array([rows, chunks, chunk_bytes])),
        _const(f"{prefix}_byte_w", byte_weights),
        _const(f"{prefix}_div", divisors),
        _const(f"{prefix}_mod", np.array(float(1 << bits), dtype=np.float32)),
        _const(f"{prefix}_u_shape", np.array([rows, padded])),
    ]
    return Subgraph(nodes, inits)


def dequant_weight_nodes(layer: QuantizedLayer, out_name: str, prefix: str, *, transpose: bool = False) -> Subgraph:
    """Option A: initializers + nodes computing the float weight `out_name` in its original layout
    (transposed to [K, N] when `transpose`, for MatMul / Gemm(transB=0) weights)."""
    rows = layer.codes.shape[0]
    groups, width, padded = option_a_layout(layer)
    unpack = _unpack_nodes(f"{prefix}_packed", rows, padded, layer.bits, prefix)
    scales = layer.scales.float().numpy().reshape(rows, groups, 1)
    zeros = layer.zeros.float().numpy().reshape(rows, groups, 1)
    flat = f"{prefix}_wflat"
    nodes = [
        *unpack.nodes,
        helper.make_node("Sub", [f"{prefix}_u", f"{prefix}_zp"], [f"{prefix}_signed"]),
        helper.make_node("Reshape", [f"{prefix}_signed", f"{prefix}_grouped"], [f"{prefix}_g"]),
        helper.make_node("Mul", [f"{prefix}_g", f"{prefix}_s"], [f"{prefix}_gs"]),
        helper.make_node("Add", [f"{prefix}_gs", f"{prefix}_z"], [f"{prefix}_gsz"]),
        helper.make_node("Reshape", [f"{prefix}_gsz", f"{prefix}_rows_padded"], [f"{prefix}_wpad"]),
        helper.make_node("Slice", [f"{prefix}_wpad", f"{prefix}_start", f"{prefix}_end", f"{prefix}_ax1"], [flat]),
    ]
    target = f"{prefix}_wT" if transpose else out_name
    nodes.append(helper.make_node("Reshape", [flat, f"{prefix}_orig_shape"], [target]))
    if transpose:
        nodes.append(helper.make_node("Transpose", [target], [out_name], perm=[1, 0]))
    inits = [
        _const(f"{prefix}_packed", packed_rows(layer, layer.group_size)),
        *unpack.initializers,
        _const(f"{prefix}_zp", np.array(float(1 << (layer.bits - 1)), dtype=np.float32)),
        _const(f"{prefix}_grouped", np.array([rows, groups, width])),
        _const(f"{prefix}_s", scales),
        _const(f"{prefix}_z", zeros),
        _const(f"{prefix}_rows_padded", np.array([rows, padded])),
        _const(f"{prefix}_start", np.array([0])),
        _const(f"{prefix}_end", np.array([layer.codes.shape[1]])),
        _const(f"{prefix}_ax1", np.array([1])),
        _const(f"{prefix}_orig_shape", np.array(layer.orig_shape)),
    ]
    return Subgraph(nodes, inits)

"""Bit-packing of signed quantization codes into uint8, in the layout ONNX Runtime's MatMulNBits reads.

Layout (for each row, along the input axis K, independently per row):
- A signed code c in `[-2^(b-1), 2^(b-1)-1]` is stored as the unsigned value u = c + 2^(b-1). ORT
  `MatMulNBits` without `zero_points` dequantizes with the default zero point 2^(b-1), i.e. to
  `(u - 2^(b-1))·scale = c·scale`; decoupleQ's float Z is then added separately by the exporter.
- The row is a little-endian bit stream: code k occupies bits `[k·b, (k+1)·b)` of the stream, bit i of
  the stream is bit `i % 8` of byte `i // 8`. For b in {2, 4, 8} this is simply "8/b codes per byte,
  the first code in the lowest bits" (2-bit: `u0 | u1<<2 | u2<<4 | u3<<6`); for b = 3 a code may
  straddle two bytes (8 codes per 3 bytes).
- K is padded to a multiple of `pad_to` columns (default: the smallest multiple that fills whole bytes)
  with code 0 (u = 2^(b-1)), which dequantizes to Z and is dropped by `unpack_codes(..., n=K)`.
- With `pad_to = block_size` the packed row has `k_blocks·block_size·b/8` bytes and reshapes to ORT's
  `B` of shape `(N, k_blocks, block_size·b/8)` (verified layout for b = 2, 4, 8; see
  reference/decoupleq.md §6.4). ORT's CPU kernel runs b = 2, 4, 8 only; 3-bit needs dequantize-at-load.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 6, 8)  # 2, 4, 8 in whole-byte lanes; 3 and 6 as a bit stream (3 bytes per chunk)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def padded_length(n: int, bits: int, pad_to: int | None = None) -> int:
    """`n` rounded up to a multiple of `pad_to` columns (default: the fewest codes filling whole bytes)."""
    _check_bits(bits)
    unit = pad_to or 8 // math.gcd(8, bits)
    if unit < 1 or unit * bits % 8:
        raise ValueError(f"pad_to={pad_to} codes do not fill whole bytes at {bits} bits")
    return math.ceil(n / unit) * unit


def packed_width(n: int, bits: int, pad_to: int | None = None) -> int:
    """Bytes per row after packing `n` codes (K padded with `padded_length` first)."""
    return padded_length(n, bits, pad_to) * bits // 8


def pack_codes(codes: torch.Tensor, bits: int, pad_to: int | None = None) -> torch.Tensor:
    """Signed codes `[..., K]` -> uint8 `[..., packed_width(K, bits, pad_to)]` (layout in the module doc)."""
    _check_bits(bits)
    offset = 2 ** (bits - 1)
    if codes.numel() and (int(codes.min()) < -offset or int(codes.max()) > offset - 1):
        raise ValueError(f"codes outside the signed {bits}-bit range [{-offset}, {offset - 1}]")
    n = codes.shape[-1]
    padded = padded_length(n, bits, pad_to)
    unsigned = (codes.to(torch.int16) + offset).to(torch.uint8)
    if padded != n:
        fill = unsigned.new_full((*unsigned.shape[:-1], padded - n), offset)
        unsigned = torch.cat([unsigned, fill], dim=-1)
    if 8 % bits == 0:
        return _pack_whole_bytes(unsigned, bits)
    return _pack_bitstream(unsigned, bits)


def _pack_whole_bytes(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    lanes = unsigned.reshape(*unsigned.shape[:-1], -1, per_byte)
    packed = torch.zeros(lanes.shape[:-1], dtype=torch.uint8, device=unsigned.device)
    for lane in range(per_byte):
        packed |= lanes[..., lane] << (lane * bits)
    return packed


def _pack_bitstream(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(bits, device=unsigned.device, dtype=torch.uint8)
    stream = ((unsigned.unsqueeze(-1) >> shifts) & 1).reshape(*unsigned.shape[:-1], -1, 8)
    weights = torch.arange(8, device=unsigned.device, dtype=torch.uint8)
    return (stream << weights).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 `[..., bytes]` from `pack_codes` -> the first `n` signed codes `[..., n]` as int8."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if n > packed.shape[-1] * 8 // bits:
        raise ValueError(f"{packed.shape[-1]} bytes hold fewer than {n} codes at {bits} bits")
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        unsigned = ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)
    else:
        bit_index = torch.arange(8, device=packed.device, dtype=torch.uint8)
        stream = ((packed.unsqueeze(-1) >> bit_index) & 1).flatten(-2)
        stream = stream[..., : stream.shape[-1] // bits * bits].reshape(*packed.shape[:-1], -1, bits)
        weights = torch.arange(bits, device=packed.device, dtype=torch.uint8)
        unsigned = (stream << weights).sum(dim=-1, dtype=torch.uint8)
    return (unsigned[..., :n].to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)

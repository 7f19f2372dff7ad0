"""onnxruntime's MatMulNBits layout, written and read in one place.

A weight W [K, N] of a MatMul is stored transposed, in blocks of `block_size` input channels: B is uint8
[N, K / block, block * bits / 8] with element j of a byte group in its j-th `bits` (low bits first), scales
float [N * K / block], zero points (optional) uint8 packed the same way, one per block, each row of N padded to
whole bytes; without them the zero point is 2**(bits-1). W[k, n] = scale * (q - zero point).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field


def check_block_size(value: int) -> int:
    """MatMulNBits takes blocks of a power of 2 (16 to 256) input channels: a settings validator."""
    if value & (value - 1):
        raise ValueError("must be a power of 2: 16, 32, 64, 128 or 256")
    return value


BlockSize = Annotated[int, Field(ge=16, le=256), AfterValidator(check_block_size)]


def pack(codes: Any, bits: int) -> Any:
    """Integer codes [..., m] (m a multiple of 8 / bits) packed along the last axis into uint8 [..., m*bits/8]."""
    import numpy as np

    per_byte = 8 // bits
    q = np.asarray(codes, np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = np.zeros(q.shape[:-1], np.uint8)
    for j in range(per_byte):
        packed |= q[..., j] << (bits * j)
    return packed


def unpack(packed: Any, bits: int, count: int) -> Any:
    """The first `count` codes of each row of uint8 [..., bytes]: `pack`'s inverse."""
    import numpy as np

    per_byte = 8 // bits
    mask = (1 << bits) - 1
    codes = np.stack([(packed >> (bits * j)) & mask for j in range(per_byte)], -1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def pack_zero_points(zero_points: Any, bits: int) -> Any:
    """Zero points [N, blocks] as MatMulNBits reads them: each row packed and padded to whole bytes."""
    import numpy as np

    n, blocks = zero_points.shape
    per_byte = 8 // bits
    padded = np.zeros((n, -(-blocks // per_byte) * per_byte), np.uint8)
    padded[:, :blocks] = zero_points
    return pack(padded, bits).reshape(-1)


def dequantize(node: Any, initializers: dict[str, Any]) -> Any:
    """The float weight [K, N] a MatMulNBits node computes with (`initializers`: name -> numpy array)."""
    import numpy as np
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)
    codes = unpack(initializers[node.input[1]], bits, block).reshape(n, blocks, block).astype(np.float32)
    scales = initializers[node.input[2]].reshape(n, blocks, 1).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zero = initializers[node.input[3]]
        zero = (unpack(zero.reshape(n, -1), bits, blocks) if zero.dtype == np.uint8 else zero.reshape(n, blocks))
        zero = zero.reshape(n, blocks, 1).astype(np.float32)
    else:
        zero = np.float32(2 ** (bits - 1))
    return (scales * (codes - zero)).reshape(n, blocks * block)[:, :k].T


def largest_dividing_block(widths: dict[str, int]) -> int:
    """The largest power-of-2 block size (16 to 256) dividing every width; 0 when none does."""
    return next((size for size in (256, 128, 64, 32, 16) if all(w % size == 0 for w in widths.values())), 0)

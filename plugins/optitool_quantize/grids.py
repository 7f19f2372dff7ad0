"""Integer block grids for weights, in torch: how values are rounded, apart from how they are stored.

A weight row is cut into blocks of `block_size` input channels; each block has a scale and an integer zero
point, and every weight of it is `scale * (code - zero)` with a code in [0, 2**bits - 1]. That is exactly what
onnxruntime's MatMulNBits computes with integer zero points (its fast CPU kernels), so a torch pass can leave
weights on such grids and `weight_only_quantize` (grid = "source") stores those grids bit for bit.

Symmetric grids fix the zero point at 2**(bits-1) (MatMulNBits' default when no zero points are stored).
"""

from __future__ import annotations

from typing import Any

SHRINK_STEPS = 20  # candidate ranges tried by the importance-weighted search: 100 % down to 50 %


def minmax_grid(w: Any, bits: int, symmetric: bool) -> tuple[Any, Any]:
    """Scale and zero point [rows, 1] of the grid spanning each row of `w` [rows, block] (round to nearest's)."""
    return _grid(w.amin(1, keepdim=True), w.amax(1, keepdim=True), bits, symmetric)


def _grid(low: Any, high: Any, bits: int, symmetric: bool) -> tuple[Any, Any]:
    import torch

    top = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        # codes -mid..mid-1 around zero: the larger side sets the step (a negative extreme may use -mid)
        scale = torch.maximum(-low / mid, high / (mid - 1)).clamp(min=1e-12)
        return scale, torch.full_like(scale, float(mid))
    low, high = low.clamp(max=0), high.clamp(min=0)  # zero is on every grid: exact zeros stay zero
    scale = ((high - low) / top).clamp(min=1e-12)
    zero = torch.round(-low / scale).clamp(0, top)
    return scale, zero


def quantize(w: Any, scale: Any, zero: Any, bits: int) -> Any:
    """`w` rounded onto the grid (scale, zero): the float values the stored codes stand for."""
    import torch

    codes = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return scale * (codes - zero)


def searched_grid(w: Any, importance: Any, bits: int, symmetric: bool) -> tuple[Any, Any]:
    """The grid per row of `w` [rows, block] that minimises the error the block's inputs see: weighted by each
    input channel's `importance` [block] (its activation energy, as llama.cpp's importance matrix), or, given
    the inputs' Gram matrix over the block [block, block], e H e^T with the correlations between channels. The
    min/max range is shrunk by up to half, each candidate scored, the best kept per row (min/max itself is a
    candidate, so the error is never above round to nearest's). Outliers that min/max would let widen the step
    are clipped when the channels that matter gain more than the clipped weights lose."""
    import torch

    low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    best_scale, best_zero = _grid(low, high, bits, symmetric)
    best_error = _error(w, best_scale, best_zero, bits, importance)
    for step in range(1, SHRINK_STEPS + 1):
        factor = 1.0 - 0.5 * step / SHRINK_STEPS
        scale, zero = _grid(low * factor, high * factor, bits, symmetric)
        error = _error(w, scale, zero, bits, importance)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_error = torch.where(better, error, best_error)
    return best_scale, best_zero


def _error(w: Any, scale: Any, zero: Any, bits: int, importance: Any) -> Any:
    e = w - quantize(w, scale, zero, bits)
    if importance.dim() == 2:
        return ((e @ importance) * e).sum(1, keepdim=True)
    return ((e**2) * importance).sum(1, keepdim=True)


def round_to_grid(weight: Any, bits: int, block_size: int, symmetric: bool,
                  importance: Any | None = None) -> tuple[Any, Any, Any]:
    """Round-to-nearest of a whole weight [out, in] in blocks of `block_size` input channels: (the weight on its
    grids, scales [out, blocks], zero points [out, blocks]). With `importance` ([in] channel energies, or the
    inputs' Gram matrix [in, in], of which each block's diagonal block is used), each block's grid is searched
    to minimise the error its inputs see; without, it spans the block's min and max."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // block_size, block_size).transpose(0, 1)  # [blocks, out, block]
    quantized, scales, zeros = [], [], []
    for index, w in enumerate(blocks):
        if importance is None:
            scale, zero = minmax_grid(w, bits, symmetric)
        else:
            part = slice(index * block_size, (index + 1) * block_size)
            scale, zero = searched_grid(w, importance[part, part] if importance.dim() == 2 else importance[part],
                                        bits, symmetric)
        quantized.append(quantize(w, scale, zero, bits))
        scales.append(scale)
        zeros.append(zero)
    import torch

    return (torch.stack(quantized, 1).reshape(rows, cols), torch.cat(scales, 1), torch.cat(zeros, 1))


def block_diagonal(hessian: Any, block_size: int) -> Any:
    """`hessian` with only its diagonal blocks of `block_size` kept: the error a block-by-block grid search sees."""
    import torch

    mask = torch.block_diag(*[torch.ones(block_size, block_size)] * (hessian.shape[0] // block_size))
    return hessian * mask.to(hessian.dtype)


def weighted_error(weight: Any, quantized: Any, hessian: Any) -> float:
    """trace((W - Q) H (W - Q)^T): the error of the layer's outputs over the calibration inputs whose Gram
    matrix is `hessian` (what GPTQ minimises, and the measure methods are compared by)."""
    diff = (weight - quantized).double()
    return float(((diff @ hessian.double()) * diff).sum())

"""GPTQ (Frantar et al., 2022): quantize a layer's weight one input column at a time and spread each column's
rounding error over the columns not yet quantized, in proportion to how the calibration inputs correlate
them (the inverse of the inputs' Gram matrix H = X^T X). Round to nearest minimises each weight's own error;
GPTQ minimises the error of the layer's outputs on the data, trace((W - Q) H (W - Q)^T), which is what the
model sees.

Columns are taken in blocks of `lazy` (the updates inside a block are applied at once to the columns after
it), and each block of `block_size` input channels gets its grid from the weights as they stand when GPTQ
reaches it (so the grid fits the already compensated values), either spanning them (min/max) or searched
against the block's part of H (as imatrix does).
"""

from __future__ import annotations

from typing import Any

from optitool_quantize.grids import minmax_grid, quantize, searched_grid


def gptq(weight: Any, hessian: Any, *, bits: int, block_size: int, symmetric: bool, damping: float = 0.01,
         search: bool = False, act_order: bool = False, lazy: int = 128) -> tuple[Any, Any, Any]:
    """Quantize `weight` [out, in] (float32) given the input Gram matrix `hessian` [in, in]; returns the
    weight on its grids and the grids (scales and zero points [out, in / block_size]). `in` must be a multiple
    of `block_size`, and `lazy` a multiple of it.

    `act_order`: columns are rounded loudest input channel first (by H's diagonal), so the errors of the
    channels that matter most are compensated by all the others. The grids still belong to contiguous
    blocks of channels (what MatMulNBits stores), so they are fixed before the walk, from the weights as
    they are ("static groups")."""
    import torch

    w = weight.detach().clone().float()
    rows, cols = w.shape
    h = hessian.detach().clone().double()
    dead = torch.diag(h) == 0  # channels no calibration input reached: their weights do not matter to it
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if act_order:
        return _gptq_in_activation_order(w, h, hessian.detach().float(), bits, block_size, symmetric, damping,
                                         search, lazy)
    inverse = _inverse_factor(h, damping)
    gram = hessian.detach().float()
    lazy = max(block_size, lazy - lazy % block_size)
    result = torch.zeros_like(w)
    scales = torch.zeros(rows, cols // block_size)
    zeros = torch.zeros(rows, cols // block_size)
    for start in range(0, cols, lazy):
        end = min(start + lazy, cols)
        chunk = w[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % block_size == 0:
                group = chunk[:, i:i + block_size]
                if search:
                    part = slice(column, column + block_size)
                    scale, zero = searched_grid(group, gram[part, part], bits, symmetric)
                else:
                    scale, zero = minmax_grid(group, bits, symmetric)
                scales[:, column // block_size] = scale[:, 0]
                zeros[:, column // block_size] = zero[:, 0]
            q = quantize(chunk[:, i:i + 1], scale, zero, bits)[:, 0]
            result[:, column] = q
            error = (chunk[:, i] - q) / inv[i, i]
            chunk[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return result, scales, zeros


def _inverse_factor(h: Any, damping: float) -> Any:
    """The upper Cholesky factor of H^-1 (H damped on its diagonal), in float32."""
    import torch

    cols = h.shape[0]
    h = h + damping * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    try:
        inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:  # not positive definite even damped: more damping
        h = h + 0.1 * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
        inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return inverse.float()


def _gptq_in_activation_order(w: Any, h: Any, gram: Any, bits: int, block_size: int, symmetric: bool,
                              damping: float, search: bool, lazy: int) -> tuple[Any, Any, Any]:
    import torch

    rows, cols = w.shape
    blocks = cols // block_size
    scales = torch.zeros(rows, blocks)
    zeros = torch.zeros(rows, blocks)
    for b in range(blocks):
        part = slice(b * block_size, (b + 1) * block_size)
        if search:
            scale, zero = searched_grid(w[:, part], gram[part, part], bits, symmetric)
        else:
            scale, zero = minmax_grid(w[:, part], bits, symmetric)
        scales[:, b], zeros[:, b] = scale[:, 0], zero[:, 0]
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    inverse = _inverse_factor(h, damping)
    group = order // block_size  # each permuted column's block
    result = torch.zeros_like(w)
    for start in range(0, cols, lazy):
        end = min(start + lazy, cols)
        chunk = w[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            b = int(group[start + i])
            q = quantize(chunk[:, i:i + 1], scales[:, b:b + 1], zeros[:, b:b + 1], bits)[:, 0]
            result[:, start + i] = q
            error = (chunk[:, i] - q) / inv[i, i]
            chunk[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    restored = torch.empty_like(result)
    restored[:, order] = result
    return restored, scales, zeros

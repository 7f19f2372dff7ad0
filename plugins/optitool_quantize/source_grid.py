"""Block quantization that finds the grid the weights already sit on.

A model dequantized from a block-quantized file (GGUF Q4_0/Q4_1/Q8_0; SmolLM2's file is Q4_1 with a Q8_0
embedding) has, in every block of 32 input channels, weights of the form `minimum + step * q`. A min/max
quantizer with an integer zero point draws another grid and rounds every weight a second time (SmolLM2
int4, onnxruntime's quantizer: perplexity +35 % over the dequantized model). Recovering each block's step
(the smallest gap between its distinct values) and minimum reproduces the weights exactly.

onnxruntime's MatMulNBits can hold an arbitrary minimum only as a float zero point, and its CPU kernel for
that is slow (5.7 tokens/s on SmolLM2 against 105 with integer zero points, measured). So the weight is
split: `step * (q - mid)` goes to the fast symmetric kernel, and the rest, constant within a block, is
`(minimum + step * mid) * sum of x over the block`: per-block sums of the input times a small float matrix
[K / block, N], added to the kernel's output. Blocks that sit on no grid of 2**bits levels (a model never
quantized) fall back to min/max on the same split, still the closest asymmetric grid.
"""

from __future__ import annotations

from typing import Any, NamedTuple

EXACT_SHARE = 0.99  # a weight counts as on a grid when this share of its blocks is
MAX_DIVISOR = 16  # the step may be the smallest gap between a block's values divided by up to this


class BlockQuantized(NamedTuple):
    packed: Any  # uint8 [N, blocks, block_size * bits / 8]: MatMulNBits' B
    scales: Any  # float32 [N * blocks]
    minimums: Any  # float32 [N * blocks]: each block's lowest level
    exact_blocks: int
    blocks: int


def quantize_on_source_grid(weight: Any, bits: int, block_size: int) -> BlockQuantized:
    """Quantize a MatMul weight [K, N] in blocks of `block_size` along K (K a multiple of the block: zero
    padding would put values on no block's grid; the caller leaves other weights in float)."""
    import numpy as np

    levels = 2**bits
    k, n = weight.shape
    blocks = np.ascontiguousarray(weight.T, np.float32).reshape(n, k // block_size, block_size)
    low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    ordered = np.sort(blocks, -1)
    gaps = np.diff(ordered, axis=-1)
    noise = 1e-6 * np.abs(ordered).max(-1, keepdims=True)
    gaps = np.where(gaps > noise, gaps, np.inf)
    step = gaps.min(-1, keepdims=True)
    span = (high - low) / (levels - 1)
    span = np.where(span > 0, span, 1.0)
    gap = np.where(np.isfinite(step) & (step > 0), step, span)

    def fits(rows: Any, candidate: Any) -> tuple[Any, Any]:
        """Which of these blocks sit on the grid of `candidate` steps, and the step refined by least
        squares over their levels (a step read off one gap carries that gap's float error to every level)."""
        offsets = blocks[rows] - low[rows]
        rounded = np.rint(offsets / candidate)
        refined = (rounded * offsets).sum(-1, keepdims=True) / np.maximum((rounded**2).sum(-1, keepdims=True), 1)
        refined = np.where(refined > 0, refined, candidate)
        found = offsets / refined
        on = (np.abs(found - np.rint(found)).max(-1) <= 1e-3) & (np.rint(found).max(-1) <= levels - 1)
        return on, refined

    # The step is the smallest gap between distinct values, or a whole fraction of it when a block misses
    # every pair of neighbouring levels (likely with 8 bits: 32 values on 256 levels); failing those, the
    # min/max grid is it whenever the block holds both its lowest and its highest level. Each candidate is
    # tried only on the blocks no earlier one fitted.
    step = span.copy()
    exact = np.zeros(blocks.shape[:-1], bool)
    for candidates in [gap / divisor for divisor in range(1, MAX_DIVISOR + 1)] + [span]:
        rows = np.nonzero(~exact)
        if not len(rows[0]):
            break
        on, refined = fits(rows, candidates[rows])
        step[rows] = np.where(on[..., None], refined, step[rows])
        exact[rows] |= on
    q = np.clip(np.rint((blocks - low) / step), 0, levels - 1).astype(np.uint8)
    per_byte = 8 // bits
    q = q.reshape(n, k // block_size, block_size // per_byte, per_byte)
    packed = np.zeros(q.shape[:-1], np.uint8)
    for j in range(per_byte):  # element j of each group in the j-th `bits` of the byte (low bits first)
        packed |= q[..., j] << (bits * j)
    scales = step.reshape(-1).astype(np.float32)
    return BlockQuantized(packed, scales, low.reshape(-1).astype(np.float32), int(exact.sum()), int(exact.size))


class SourceGridResult(NamedTuple):
    nodes: int
    exact_blocks: int
    blocks: int
    eight_bit: list[str]  # weights on no grid of `bits` bits but on an 8-bit one, stored in 8 bits


def quantize_matmuls_on_source_grid(model: Any, bits: int, block_size: int, accuracy_level: int,
                                    exclude: list[str]) -> SourceGridResult:
    """Replace every MatMul whose weight is a 2-D initializer (K divisible by the block) with the split
    described above, in place. A weight that sits on an 8-bit grid and not on one of `bits` (a Q8_0
    embedding tied to the LM head) is stored in 8 bits rather than rounded."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    nodes, changed, exact, total, eight_bit = [], 0, 0, 0, []
    sums: dict[str, str] = {}
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or node.name in exclude or weight.dims[0] % block_size:
            nodes.append(node)
            continue
        array = numpy_helper.to_array(weight)
        k, n = array.shape
        width = bits
        done = quantize_on_source_grid(array, bits, block_size)
        if bits < 8 and done.exact_blocks < EXACT_SHARE * done.blocks:
            wider = quantize_on_source_grid(array, 8, block_size)
            if wider.exact_blocks >= EXACT_SHARE * wider.blocks:
                done, width = wider, 8
                eight_bit.append(weight.name)
        mid = 2 ** (width - 1)
        blocks = k // block_size
        step = done.scales.reshape(n, blocks)
        low = done.minimums.reshape(n, blocks)
        offset = (low + step * mid).T.astype(np.float32)  # [blocks, N]
        base = f"{node.input[1]}_q{width}"
        graph.initializer.extend([numpy_helper.from_array(done.packed, base),
                                  numpy_helper.from_array(done.scales, f"{base}_scales"),
                                  numpy_helper.from_array(offset, f"{base}_offsets")])
        attrs = {"K": k, "N": n, "bits": width, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        x = node.input[0]
        if x not in sums:  # one per input: q/k/v and gate/up share theirs
            shape = f"{x}_block_shape"  # [batch, sequence, blocks, block]: 0 keeps the input's dimension
            graph.initializer.append(numpy_helper.from_array(np.array([0, 0, blocks, block_size], np.int64), shape))
            nodes += [helper.make_node("Reshape", [x, shape], [f"{x}_blocks"], name=f"{x}_to_blocks"),
                      helper.make_node("ReduceSum", [f"{x}_blocks", f"{x}_sum_axis"], [f"{x}_block_sums"],
                                       name=f"{x}_block_sum", keepdims=0)]
            graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{x}_sum_axis"))
            sums[x] = f"{x}_block_sums"
        out = node.output[0]
        nodes += [helper.make_node("MatMulNBits", [x, base, f"{base}_scales"], [f"{out}_nbits"],
                                   name=f"{node.name}_Q{width}", domain="com.microsoft", **attrs),
                  helper.make_node("MatMul", [sums[x], f"{base}_offsets"], [f"{out}_offset"], name=f"{node.name}_off"),
                  helper.make_node("Add", [f"{out}_nbits", f"{out}_offset"], [out], name=f"{node.name}_add")]
        changed, exact, total = changed + 1, exact + done.exact_blocks, total + done.blocks
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)
    if changed and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return SourceGridResult(changed, exact, total, eight_bit)

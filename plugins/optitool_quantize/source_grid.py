"""Block quantization that finds the grid the weights already sit on.

Two kinds of grid are found, each exactly:
- **integer zero points**: every weight of a block is `scale * (code - zero)` with an integer `zero`. Weights a
  data-aware torch pass (`gptq`, `imatrix`) left on its grids, and GGUF's symmetric Q8_0/Q4_0 blocks, are of
  this kind. They are stored as plain MatMulNBits with uint8 zero points (none when every zero point is the
  symmetric default), onnxruntime's fast kernels, with nothing else on the path.
- **float minimums**: `minimum + step * q`, GGUF's Q4_1 (SmolLM2's file). A min/max quantizer with an integer
  zero point draws another grid and rounds every weight a second time (SmolLM2 int4, onnxruntime's
  quantizer: perplexity +35 % over the dequantized model). MatMulNBits can hold an arbitrary minimum only as
  a float zero point, and its CPU kernel for that is slow (5.7 tokens/s on SmolLM2 against 105 with integer
  zero points, measured). So the weight is split: `step * (q - mid)` goes to the fast symmetric kernel, and
  the rest, constant within a block, is `(minimum + step * mid) * sum of x over the block`: per-block sums of
  the input times a small float matrix [K / block, N], added to the kernel's output (an extra MatMul and Add
  per projection: exact, but slower than integer zero points; run a data-aware pass first to avoid it).
Blocks that sit on no grid of 2**bits levels (a model never quantized) fall back to min/max with an integer
zero point.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from optitool_quantize.nbits import pack

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
    packed = pack(q, bits)
    scales = step.reshape(-1).astype(np.float32)
    return BlockQuantized(packed, scales, low.reshape(-1).astype(np.float32), int(exact.sum()), int(exact.size))


class IntegerGrid(NamedTuple):
    codes: Any  # uint8 [N, blocks, block_size]
    scales: Any  # float32 [N * blocks]
    zeros: Any  # uint8 [N, blocks]
    exact_blocks: int
    blocks: int


def integer_grid(weight: Any, bits: int, block_size: int) -> IntegerGrid:
    """Find, for each block of a MatMul weight [K, N], a scale and an integer zero point that give its weights
    exactly; blocks with none get min/max round to nearest (with zero in range, as every integer grid has).

    On such a grid zero is a level, so every weight is a whole multiple of the scale: the scale is the
    smallest nonzero magnitude, or the smallest gap between values, divided by a whole number (a block need not
    use neighbouring levels), and the first candidate that makes every weight a multiple within the code range
    is refined by least squares over the block's levels."""
    import numpy as np

    top, mid = 2**bits - 1, 2 ** (bits - 1)
    k, n = weight.shape
    blocks = np.ascontiguousarray(weight.T, np.float64).reshape(-1, block_size)
    count = blocks.shape[0]
    scale = np.ones(count)
    zero = np.full(count, mid, np.int64)
    levels = np.zeros(blocks.shape)
    magnitude = np.abs(blocks)
    smallest = np.where(magnitude > 0, magnitude, np.inf).min(1)
    ordered = np.sort(blocks, 1)
    gaps = np.diff(ordered, axis=1)
    gaps = np.where(gaps > 1e-7 * magnitude.max(1, keepdims=True), gaps, np.inf).min(1)
    exact = ~np.isfinite(smallest)  # a block of zeros is on every grid: code `mid`, any scale
    for base in (smallest, gaps):
        for divisor in range(1, MAX_DIVISOR + 1):
            rows = np.nonzero(~exact & np.isfinite(base))[0]
            if not len(rows):
                break
            # The candidate step comes from one gap or magnitude, so its float error grows with the codes it
            # is divided into (8-bit codes reach 255): near-integer codes first, then the step refined by least
            # squares over the whole block, then the exact test against the refined step.
            found = blocks[rows] / (base[rows] / divisor)[:, None]
            rounded = np.rint(found)
            near = (np.abs(found - rounded).max(1) <= 0.05) & ((rounded**2).sum(1) > 0)
            rows, rounded = rows[near], rounded[near]
            refined = (rounded * blocks[rows]).sum(1) / (rounded**2).sum(1)
            found = blocks[rows] / refined[:, None]
            low, high = rounded.min(1), rounded.max(1)
            zero_low, zero_high = np.maximum(0, -low), np.minimum(top, top - high)
            on = (np.abs(found - rounded).max(1) <= 1e-3) & (zero_low <= zero_high)
            rows, rounded, refined = rows[on], rounded[on], refined[on]
            if not len(rows):
                continue
            keep_mid = (zero_low[on] <= mid) & (mid <= zero_high[on])  # symmetric blocks keep the default
            zero[rows] = np.where(keep_mid, mid, zero_low[on])
            scale[rows] = refined
            levels[rows] = rounded
            exact[rows] = True
    rest = np.nonzero(~exact)[0]
    if len(rest):  # round to nearest on the min/max grid that holds zero
        low = np.minimum(blocks[rest].min(1), 0)
        high = np.maximum(blocks[rest].max(1), 0)
        step = np.maximum((high - low) / top, 1e-12)
        zero[rest] = np.clip(np.rint(-low / step), 0, top)
        scale[rest] = step
        levels[rest] = np.clip(np.rint(blocks[rest] / step[:, None]) + zero[rest][:, None], 0, top) - zero[rest][:, None]
    codes = (levels + zero[:, None]).astype(np.uint8).reshape(n, k // block_size, block_size)
    return IntegerGrid(codes, scale.astype(np.float32), zero.astype(np.uint8).reshape(n, k // block_size),
                       int(exact.sum()), count)


class SourceGridResult(NamedTuple):
    nodes: int
    exact_blocks: int
    blocks: int
    eight_bit: list[str]  # weights on no grid of `bits` bits but on an 8-bit one, stored in 8 bits
    with_offsets: list[str]  # weights on float-minimum grids, stored with the offset term
    replaced: dict[str, str]  # MatMulNBits node name -> digest of the float weight it replaced


def embedding_tables(graph: Any) -> dict[str, tuple[Any, Any]]:
    """Gather nodes (axis 0) whose table [vocabulary, hidden] is a constant, by node name: (the table, the
    Transpose node it comes through, if any). onnxruntime-genai's builder stores a tied table once, as the
    head's weight [hidden, vocabulary], and gathers from Transpose(that weight)."""
    from onnx import helper, numpy_helper

    weights = {i.name: i for i in graph.initializer}
    transposes = {n.output[0]: n for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights}
    found = {}
    for node in graph.node:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or axis != 0:
            continue
        if node.input[0] in weights and len(weights[node.input[0]].dims) == 2:
            found[node.name] = (numpy_helper.to_array(weights[node.input[0]]), None)
        elif node.input[0] in transposes:
            transpose = transposes[node.input[0]]
            perm = next((helper.get_attribute_value(a) for a in transpose.attribute if a.name == "perm"), None)
            source = weights[transpose.input[0]]
            if len(source.dims) == 2 and list(perm or [1, 0]) == [1, 0]:
                found[node.name] = (numpy_helper.to_array(source).T, transpose)
    return found


def quantize_matmuls_on_source_grid(model: Any, bits: int, block_size: int, accuracy_level: int,
                                    exclude: list[str], head_bits: int | None = None,
                                    head_block_size: int | None = None) -> SourceGridResult:
    """Replace every MatMul whose weight is a 2-D initializer (K divisible by the block) with MatMulNBits on
    the grid its weight sits on, in place: an integer-zero-point grid where there is one (at `bits`, or at 8
    bits for a weight on no grid of `bits`: a Q8_0 embedding tied to the LM head), else a float-minimum grid
    with the offset term, else min/max round to nearest. The LM head (the MatMul that gives the graph's
    logits, or whose weight is an embedding table's transpose: the layer small models are most sensitive in,
    and the largest read per token) goes in
    `head_bits`, on its own grid of those bits where it has one (GGUF's Q8_0), else rounded to nearest, in
    blocks of `head_block_size` (default `block_size`); with `head_bits` None, in the bits of the grid it sits
    on (`bits` or 8), else rounded to nearest in 8."""
    import numpy as np
    from onnx import helper, numpy_helper

    from optitool_quantize.nbits import pack, pack_zero_points

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    tied = {digest(table.T) for table, _ in embedding_tables(graph).values()}
    outputs = {o.name for o in graph.output}
    nodes, changed, exact, total, eight_bit, with_offsets = [], 0, 0, 0, [], []
    replaced: dict[str, str] = {}
    sums: dict[str, str] = {}
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or node.name in exclude:
            nodes.append(node)
            continue
        array = numpy_helper.to_array(weight)
        head = node.output[0] in outputs or digest(array) in tied  # gives logits, or is the table
        size = (head_block_size or block_size) if head else block_size
        if weight.dims[0] % size:
            if head and head_block_size:  # never leave the largest matrix in float unasked
                from optitool import PassError

                fits = [b for b in (16, 32, 64, 128, 256) if weight.dims[0] % b == 0]
                raise PassError(f"head_block_size = {size} does not divide the LM head's input width "
                                f"{weight.dims[0]}; choose one that does: {fits}")
            nodes.append(node)
            continue
        replaced[f"{node.name}_Q"] = digest(array)
        k, n = array.shape
        blocks = k // size
        attrs: dict[str, Any] = {"K": k, "N": n, "block_size": size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        x, out = node.input[0], node.output[0]
        # the LM head: in head_bits, on its own grid of those bits or rounded to nearest; unset, on the grid it
        # sits on (`bits`, else 8: what a data-aware pass's mixed plan gave it), else rounded to nearest in 8
        width = (head_bits or bits) if head else bits
        grid = integer_grid(array, width, size)
        if head and head_bits is None and width < 8 and grid.exact_blocks < EXACT_SHARE * grid.blocks:
            grid, width = integer_grid(array, 8, size), 8
        if head and width == 8 and bits < 8:
            eight_bit.append(weight.name)
        if grid.exact_blocks < EXACT_SHARE * grid.blocks and width < 8 and not head:
            wider = integer_grid(array, 8, block_size)
            if wider.exact_blocks >= EXACT_SHARE * wider.blocks:
                grid, width = wider, 8
                eight_bit.append(weight.name)
        floating = None
        if grid.exact_blocks < EXACT_SHARE * grid.blocks and not head:
            for candidate_bits in dict.fromkeys((bits, 8)):
                found = quantize_on_source_grid(array, candidate_bits, block_size)
                if found.exact_blocks >= EXACT_SHARE * found.blocks:
                    floating, width = found, candidate_bits
                    if candidate_bits != bits:
                        eight_bit.append(weight.name)
                    break
        base = f"{node.input[1]}_q{width}"
        attrs["bits"] = width
        if floating is None:
            inputs = [x, base, f"{base}_scales"]
            graph.initializer.extend([numpy_helper.from_array(pack(grid.codes, width), base),
                                      numpy_helper.from_array(grid.scales, f"{base}_scales")])
            if (grid.zeros != 2 ** (width - 1)).any():
                graph.initializer.append(numpy_helper.from_array(pack_zero_points(grid.zeros, width), f"{base}_zeros"))
                inputs.append(f"{base}_zeros")
            nodes.append(helper.make_node("MatMulNBits", inputs, [out], name=f"{node.name}_Q{width}",
                                          domain="com.microsoft", **attrs))
            changed, exact, total = changed + 1, exact + grid.exact_blocks, total + grid.blocks
            continue
        with_offsets.append(weight.name)
        mid = 2 ** (width - 1)
        step = floating.scales.reshape(n, blocks)
        low = floating.minimums.reshape(n, blocks)
        offset = (low + step * mid).T.astype(np.float32)  # [blocks, N]
        graph.initializer.extend([numpy_helper.from_array(floating.packed, base),
                                  numpy_helper.from_array(floating.scales, f"{base}_scales"),
                                  numpy_helper.from_array(offset, f"{base}_offsets")])
        if x not in sums:  # one per input: q/k/v and gate/up share theirs
            # [..., K] -> [..., blocks, block] whatever the input's rank: its shape but the last, then the blocks
            graph.initializer.extend([
                numpy_helper.from_array(np.array([blocks, block_size], np.int64), f"{x}_block_dims"),
                numpy_helper.from_array(np.array([0], np.int64), f"{x}_shape_start"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{x}_shape_end"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{x}_sum_axis")])
            nodes += [helper.make_node("Shape", [x], [f"{x}_shape"], name=f"{x}_shape"),
                      helper.make_node("Slice", [f"{x}_shape", f"{x}_shape_start", f"{x}_shape_end"],
                                       [f"{x}_leading"], name=f"{x}_leading"),
                      helper.make_node("Concat", [f"{x}_leading", f"{x}_block_dims"], [f"{x}_block_shape"],
                                       name=f"{x}_block_shape", axis=0),
                      helper.make_node("Reshape", [x, f"{x}_block_shape"], [f"{x}_blocks"], name=f"{x}_to_blocks"),
                      helper.make_node("ReduceSum", [f"{x}_blocks", f"{x}_sum_axis"], [f"{x}_block_sums"],
                                       name=f"{x}_block_sum", keepdims=0)]
            sums[x] = f"{x}_block_sums"
        nodes += [helper.make_node("MatMulNBits", [x, base, f"{base}_scales"], [f"{out}_nbits"],
                                   name=f"{node.name}_Q{width}", domain="com.microsoft", **attrs),
                  helper.make_node("MatMul", [sums[x], f"{base}_offsets"], [f"{out}_offset"], name=f"{node.name}_off"),
                  helper.make_node("Add", [f"{out}_nbits", f"{out}_offset"], [out], name=f"{node.name}_add")]
        changed, exact, total = changed + 1, exact + floating.exact_blocks, total + floating.blocks
    replace_nodes(model, nodes, contrib=bool(changed))
    return SourceGridResult(changed, exact, total, eight_bit, with_offsets, replaced)


def replace_nodes(model: Any, nodes: list[Any], *, contrib: bool) -> None:
    """The graph's nodes become `nodes`; initializers nothing reads any more go; with `contrib`, the
    com.microsoft opset (MatMulNBits, GatherBlockQuantized) is declared."""
    from onnx import helper

    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)
    if contrib and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def digest(array: Any) -> str:
    import hashlib

    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array, np.float32).tobytes()).hexdigest()


class EmbeddingResult(NamedTuple):
    tables: int
    shared_with_head: int
    bits: list[int]


def quantize_embeddings(model: Any, bits: int, block_size: int, head_bits: int = 8,
                        replaced: dict[str, str] | None = None) -> EmbeddingResult:
    """Replace each Gather from an embedding table [vocabulary, hidden] with GatherBlockQuantized, in place.

    A table tied to the LM head (the MatMulNBits that replaced a weight equal to the table transposed:
    `replaced` maps node name prefixes to those weights' digests) shares the head's packed codes: the model
    stores the largest matrix of a small LLM once, in the head's bits. Another table is stored on the integer
    grid it sits on (at `bits` or 8), else rounded to nearest in `head_bits`."""
    import numpy as np
    from onnx import helper, numpy_helper

    from optitool_quantize.nbits import pack, pack_zero_points

    graph = model.graph
    arrays = {i.name: i for i in graph.initializer}
    heads = {}  # the float values a MatMulNBits head computes with -> its node
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            heads.setdefault(attrs["N"], []).append(node)
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in [*graph.input, *graph.value_info]}
    found = embedding_tables(graph)
    nodes, tables, shared, widths = [], 0, 0, []
    for node in graph.node:
        values = found[node.name][0] if node.name in found else None
        if values is None or values.shape[1] % block_size:
            nodes.append(node)
            continue
        table_name = node.input[0]
        vocabulary, hidden = values.shape
        size = block_size
        blocks = hidden // size
        tied = digest(values.T)
        head = next((c for c in heads.get(vocabulary, []) if (replaced or {}).get(c.name.rsplit("_Q", 1)[0] + "_Q")
                     == tied), None)
        if head is not None:  # tied: share the head's codes, in the head's blocks
            attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
            width, size = attrs["bits"], attrs["block_size"]
            blocks = hidden // size
            data = head.input[1]
            scale_values = numpy_helper.to_array(arrays[head.input[2]]).reshape(vocabulary, blocks)
            zero_values = (unpack_zero_points(numpy_helper.to_array(arrays[head.input[3]]), width, vocabulary, blocks)
                           if len(head.input) > 3 and head.input[3] else None)
            shared += 1
        else:
            grid, width = integer_grid(values.T, bits, block_size), bits
            if grid.exact_blocks < EXACT_SHARE * grid.blocks:
                wider = integer_grid(values.T, 8, block_size)
                grid, width = (wider, 8) if wider.exact_blocks >= EXACT_SHARE * wider.blocks else (
                    integer_grid(values.T, head_bits, block_size), head_bits)
            data = f"{table_name}_q{width}"
            graph.initializer.append(numpy_helper.from_array(pack(grid.codes, width), data))
            scale_values = grid.scales.reshape(vocabulary, blocks)
            zero_values = grid.zeros if (grid.zeros != 2 ** (width - 1)).any() else None
        base = f"{table_name}_gather_q{width}"
        inputs = [data, node.input[1], f"{base}_scales"]
        shaped = [numpy_helper.from_array(np.array([vocabulary, blocks, 1], np.int64), f"{base}_scales_shape")]
        if head is not None:  # the head's scales, read as [vocabulary, blocks, 1]: stored once in the file
            nodes.append(helper.make_node("Reshape", [head.input[2], f"{base}_scales_shape"], [f"{base}_scales"],
                                          name=f"{node.name}_scales"))
            graph.initializer.extend(shaped)
        else:
            graph.initializer.append(numpy_helper.from_array(scale_values.reshape(vocabulary, blocks, 1),
                                                             f"{base}_scales"))
        if zero_values is not None:  # one per block: each packed on its own (the axis they run along has size 1)
            packed = pack_zero_points(zero_values.reshape(-1, 1), width).reshape(vocabulary, blocks, 1)
            graph.initializer.append(numpy_helper.from_array(packed, f"{base}_zeros"))
            inputs.append(f"{base}_zeros")
        shape = f"{base}_shape"
        graph.initializer.append(numpy_helper.from_array(
            np.array([0] * ranks.get(node.input[1], 2) + [hidden], np.int64), shape))
        nodes += [helper.make_node("GatherBlockQuantized", inputs, [f"{node.output[0]}_blocks"],
                                   name=f"{node.name}_Q{width}", domain="com.microsoft", gather_axis=0,
                                   quantize_axis=2, block_size=size, bits=width),
                  helper.make_node("Reshape", [f"{node.output[0]}_blocks", shape], [node.output[0]],
                                   name=f"{node.name}_unblock")]
        tables, widths = tables + 1, [*widths, width]
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Transpose" or any(o in used for o in n.output)]  # gathered from
    replace_nodes(model, nodes, contrib=bool(tables))
    return EmbeddingResult(tables, shared, widths)


def unpack_zero_points(packed: Any, bits: int, rows: int, blocks: int) -> Any:
    """`pack_zero_points`' inverse: [rows, blocks] zero points from MatMulNBits' packed rows."""
    from optitool_quantize.nbits import unpack

    return unpack(packed.reshape(rows, -1), bits, blocks)

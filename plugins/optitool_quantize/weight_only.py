"""Block-wise weight-only quantization of ONNX models (onnxruntime's MatMulNBits): the weights of every
MatMul stored in 4 or 8 bits with one scale (and, asymmetric, one zero point) per block of input
channels, activations left in float. What LLM decoding on CPU wants: it reads every weight once per
token, so the bytes read are the time spent."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from optitool import OnnxModel, Pass, PassConfig, PassContext, PassError
from optitool_quantize.nbits import BlockSize
from optitool_quantize.siblings import fuse_sibling_matmuls
from optitool_quantize.source_grid import quantize_embeddings, quantize_matmuls_on_source_grid


class WeightOnlyConfig(PassConfig):
    bits: Literal[4, 8] = Field(4, description="bits per weight")
    block_size: BlockSize = Field(32, description="input channels sharing one scale (a power of 2)")
    symmetric: bool = Field(False, description="no zero point (asymmetric keeps a minimum per block, as Q4_1)")
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None, description="onnxruntime's compute type for the MatMul: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
        "(activations rounded to int8 per block). Unset: 4 when the run's device is the CPU, whose fast kernels "
        "are the int8 ones (onnxruntime 1.32: 8-bit weights decode about 18x slower at 0-3, 4-bit 1.5x; SmolLM2 "
        "pays about +0.3 % perplexity for it), 0 on a GPU, as onnxruntime-genai's builder chooses")
    op_types: list[Literal["MatMul", "Gather"]] = Field(
        default_factory=lambda: ["MatMul"], description="MatMul weights; Gather adds the embedding table")
    exclude_nodes: list[str] = Field(default_factory=list, description="ONNX node names left in float")
    head_bits: Literal[4, 8] | None = Field(
        None, description="grid = source: bits of the LM head (and of a tied embedding); unset, those of the grid "
        "it sits on (a gptq/imatrix pass's 4 or 8 bits, its mixed plan's, GGUF's Q8_0), else 8 rounded to nearest: "
        "small models lose most there, and it is the largest matrix read per token")
    head_block_size: BlockSize | None = Field(
        None, description="grid = source: input channels sharing one scale in the LM head (and a tied embedding); "
        "default block_size. In wider blocks an 8-bit head keeps fewer scales and zero points (SmolLM2's, "
        "blocks of 64 instead of 32: 2.2 MB less); its input width must be whole blocks")
    grid: Literal["minmax", "source"] = Field(
        "minmax", description="minmax: onnxruntime's quantizer (block min/max, integer zero point); source: "
        "store exactly the grid each block already sits on (weights a gptq or imatrix pass rounded, GGUF "
        "Q4_x/Q8_0 files; min/max where there is none), MatMul weights only")
    fuse_siblings: bool = Field(
        True, description="merge the quantized MatMuls that read one tensor (gate and up; separate q, k, v) into "
        "one MatMulNBits and a Split: exact, and one call instead of two or three (SmolLM2's gate/up on 2 cores: "
        "0.45 ms per token less)")

    @model_validator(mode="after")
    def _source_only(self) -> WeightOnlyConfig:
        given = [name for name in ("head_bits", "head_block_size") if getattr(self, name) is not None]
        if given and self.grid != "source":
            raise ValueError(f"{' and '.join(given)} take effect with grid = \"source\" only (onnxruntime's min/max "
                             "quantizer rounds the head like every other weight); set grid = \"source\" or remove "
                             "them")
        return self


class WeightOnlyQuantize(Pass):
    """4- or 8-bit block-wise weight-only quantization of ONNX MatMul weights (onnxruntime MatMulNBits)."""

    keeps_widths = True

    name = "weight_only_quantize"
    compresses = True
    Config = WeightOnlyConfig
    takes = "onnx"
    gives = "onnx"

    def check_widths(self, widths: dict[str, int]) -> None:
        """A weight narrower than one block cannot be stored in blocks (its width is its input channels)."""
        from optitool import ConfigError

        cfg: WeightOnlyConfig = self.config
        narrow = {role: width for role, width in widths.items() if width < cfg.block_size}
        if narrow:
            role, width = next(iter(narrow.items()))
            raise ConfigError(f"block_size = {cfg.block_size} is wider than the model's {role} width {width} (the "
                              "input width of its projections, read from its files): choose a block_size of "
                              f"at most {width}")
        hidden = widths.get("hidden")
        if cfg.head_block_size and hidden and hidden % cfg.head_block_size:
            raise ConfigError(f"head_block_size = {cfg.head_block_size} does not divide the model's hidden width "
                              f"{hidden} (the LM head's input width, read from its files): choose one that does")

    def run(self, model: OnnxModel, ctx: PassContext) -> OnnxModel:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        cfg: WeightOnlyConfig = self.config
        accuracy_level = default_accuracy_level(ctx.device) if cfg.accuracy_level is None else cfg.accuracy_level
        graph_model = onnx.load(str(model.path))
        rewritten = gemm_as_matmul(graph_model)
        untied = transposed_weights_as_initializers(graph_model)
        extra: dict[str, Any] = {}
        if cfg.grid == "source":
            found = quantize_matmuls_on_source_grid(graph_model, cfg.bits, cfg.block_size, accuracy_level,
                                                    cfg.exclude_nodes, cfg.head_bits, cfg.head_block_size)
            extra.update(blocks_on_source_grid=round(found.exact_blocks / max(found.blocks, 1), 4),
                         weights_in_8_bits=found.eight_bit, weights_with_offsets=len(found.with_offsets))
            if "Gather" in cfg.op_types:
                # a table tied to the head shares its codes; another one on no grid is rounded in head_bits, or 8
                tables = quantize_embeddings(graph_model, cfg.bits, cfg.block_size, cfg.head_bits or 8,
                                             found.replaced)
                extra.update(embeddings_quantized=tables.tables, embeddings_shared_with_head=tables.shared_with_head,
                             embedding_bits=tables.bits)
            if found.with_offsets:
                ctx.flag(f"{len(found.with_offsets)} weight(s) sit on grids with float minimums (GGUF Q4_1) and "
                         "carry an extra offset MatMul each, which decodes slower than integer zero points; "
                         "a data-aware pass before the export (gptq, imatrix) puts them on integer grids")
        ops = tuple(cfg.op_types) if cfg.grid == "minmax" else ()
        if ops:
            quantizer = MatMulNBitsQuantizer(graph_model, bits=cfg.bits, block_size=cfg.block_size,
                                             is_symmetric=cfg.symmetric, accuracy_level=accuracy_level or None,
                                             nodes_to_exclude=cfg.exclude_nodes, op_types_to_quantize=ops)
            quantizer.process()
            graph_model = quantizer.model.model
        quantized = graph_model
        changed = sum(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in quantized.graph.node)
        if not changed:
            raise PassError(f"no {' or '.join(cfg.op_types)} weight could be quantized to {cfg.bits} bits with "
                            f"block_size {cfg.block_size} (a weight's input dimension must be at least one block)")
        if cfg.fuse_siblings:
            extra.update(fused_matmul_groups=fuse_sibling_matmuls(quantized))
        from optitool import save_onnx

        target = save_onnx(quantized, ctx.stage_dir / "model.onnx")
        before, after = model.size_bytes(), OnnxModel(target).size_bytes()
        ctx.metrics.update(size_before_bytes=before, size_after_bytes=after, size_ratio=round(after / before, 4),
                           quantized_nodes=changed, bits=cfg.bits, block_size=cfg.block_size,
                           accuracy_level=accuracy_level,
                           gemm_rewritten_as_matmul=rewritten, transposed_weights_materialized=untied, **extra)
        return OnnxModel(target, tokenizer=model.tokenizer, input_names=model.input_names)


def default_accuracy_level(device: str) -> int:
    """The accuracy level a model quantized for `device` gets when none is set: int8 activations on the CPU,
    where MatMulNBits' float paths dequantize whole weights per call, unset on a GPU."""
    return 4 if device.split(":")[0] == "cpu" else 0


def transposed_weights_as_initializers(model: Any) -> int:
    """Replace Transpose(weight) -> MatMul with the transposed weight itself, in place; returns how many.

    A tied LM head is exported as MatMul(hidden, Transpose(embedding table)): the quantizer only takes a
    MatMul whose weight is an initializer, so the largest matrix of a small LLM stayed float and was
    transposed again on every call. Materialised, the head is quantized like every other projection (and,
    with op_types including Gather, the embedding table too: both end far smaller than the one float table).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    materialized, dropped = 0, set()
    for node in graph.node:
        users = consumers.get(node.output[0] if node.output else "", [])
        if (node.op_type != "Transpose" or node.input[0] not in weights or node.output[0] in outputs or not users
                or any(u.op_type != "MatMul" or list(u.input).index(node.output[0]) != 1 for u in users)):
            continue
        perm = helper.get_attribute_value(node.attribute[0]) if node.attribute else None
        array = numpy_helper.to_array(weights[node.input[0]]).transpose(perm).copy()
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        dropped.add(id(node))
        materialized += 1
    if materialized:
        kept = [n for n in graph.node if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
    return materialized


def gemm_as_matmul(model: Any) -> int:
    """Rewrite each Gemm with a constant weight as MatMul (+ Add for its bias), in place: exporters write a
    2-D Linear as Gemm, which MatMulNBits does not take. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    rewritten, nodes = 0, []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T.copy()
        name = f"{node.input[1]}_as_matmul"
        graph.initializer.append(numpy_helper.from_array(weight, name))
        bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for initializer in unused:
        graph.initializer.remove(initializer)
    return rewritten

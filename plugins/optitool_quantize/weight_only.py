"""Block-wise weight-only quantization of ONNX models (onnxruntime's MatMulNBits): the weights of every
MatMul stored in 4 or 8 bits with one scale (and, asymmetric, one zero point) per block of input
channels, activations left in float. What LLM decoding on CPU wants: it reads every weight once per
token, so the bytes read are the time spent."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from optitool import OnnxModel, Pass, PassConfig, PassContext, PassError


class WeightOnlyConfig(PassConfig):
    bits: Literal[4, 8] = Field(4, description="bits per weight")
    block_size: int = Field(32, ge=16, le=256, description="input channels sharing one scale (a power of 2)")
    symmetric: bool = Field(False, description="no zero point (asymmetric keeps a minimum per block, as Q4_1)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        0, description="onnxruntime's compute type for the MatMul: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8")
    op_types: list[Literal["MatMul", "Gather"]] = Field(
        default_factory=lambda: ["MatMul"], description="MatMul weights; Gather adds the embedding table")
    exclude_nodes: list[str] = Field(default_factory=list, description="ONNX node names left in float")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of 2 (16, 32, 64, 128 or 256), not {value}")
        return value


class WeightOnlyQuantize(Pass):
    """4- or 8-bit block-wise weight-only quantization of ONNX MatMul weights (onnxruntime MatMulNBits)."""

    name = "weight_only_quantize"
    Config = WeightOnlyConfig
    takes = "onnx"
    gives = "onnx"

    def run(self, model: OnnxModel, ctx: PassContext) -> OnnxModel:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        cfg: WeightOnlyConfig = self.config
        graph_model = onnx.load(str(model.path))
        rewritten = gemm_as_matmul(graph_model)
        quantizer = MatMulNBitsQuantizer(graph_model, bits=cfg.bits, block_size=cfg.block_size,
                                         is_symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level or None,
                                         nodes_to_exclude=cfg.exclude_nodes, op_types_to_quantize=tuple(cfg.op_types))
        quantizer.process()
        quantized = quantizer.model.model
        changed = sum(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in quantized.graph.node)
        if not changed:
            raise PassError(f"no {' or '.join(cfg.op_types)} weight could be quantized to {cfg.bits} bits with "
                            f"block_size {cfg.block_size} (a weight's input dimension must be at least one block)")
        from optitool import save_onnx

        target = save_onnx(quantized, ctx.stage_dir / "model.onnx")
        before, after = model.size_bytes(), OnnxModel(target).size_bytes()
        ctx.metrics.update(size_before_bytes=before, size_after_bytes=after, size_ratio=round(after / before, 4),
                           quantized_nodes=changed, bits=cfg.bits, block_size=cfg.block_size,
                           gemm_rewritten_as_matmul=rewritten)
        return OnnxModel(target, tokenizer=model.tokenizer, input_names=model.input_names)


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

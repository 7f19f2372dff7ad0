"""Activation-aware channel scales (AWQ's idea), searched against the calibration inputs and folded so the
float model computes exactly what it did.

A layer's loud input channels carry most of its output error, and a block grid gives every channel of a
block the same step. Multiplying input channel j of the layers that read one tensor by s_j, and dividing the
tensor's producer (the norm before them, or the projection that made it) by s_j, changes nothing in float;
after rounding, a channel with s_j > 1 gets a relatively finer step. s_j = rms_j ** alpha, with alpha searched
per group of readers from 0 (no scaling: never worse than plain rounding on the measure used) to 1, in steps
of 0.2 and then 0.1 either side of the best (8 roundings of the group instead of 11; on the fine-tuned
SmolLM2 the chosen alphas were 0.0-0.4 for most groups, up to 0.8 for a few).

The groups come from the architecture's roles: norm -> attention inputs, norm -> MLP inputs, value ->
attention output (each value channel feeding one output channel per query head of its group), and the MLP's
linear input -> MLP output. What cannot be folded is refused by name: a post-norm family's attention and MLP
inputs (BERT: they read the residual stream), an MLP whose input reaches its output through a nonlinearity
(GPT-2's GELU), a norm without an elementwise weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optitool import Architecture, is_conv1d

COARSE_ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # then the best one's neighbours 0.1 either side
RoundWeight = Callable[[Any, Any], Any]


@dataclass
class ScaleGroup:
    """Layers (`readers`, full names) that read one tensor, and the producer of that tensor whose output
    channels take the inverse scales: a norm, or a projection (`rows`: which of its output channels, for a
    fused query/key/value projection). `repeat`: each producer channel feeds this many consecutive reader
    channel groups of `head_dim` (grouped-query attention's value heads)."""

    name: str
    readers: list[str]
    producer: Any
    rows: slice | None = None
    repeat: int = 1
    head_dim: int = 0


def _out_features(layer: Any) -> int:
    return layer.weight.shape[1] if is_conv1d(layer) else layer.weight.shape[0]


def _in_features(layer: Any) -> int:
    return layer.weight.shape[0] if is_conv1d(layer) else layer.weight.shape[1]


def scale_groups(block: Any, prefix: str, arch: Architecture, head_dim: int | None) -> tuple[list[ScaleGroup],
                                                                                              dict[str, str]]:
    """The foldable groups of one block (reader names prefixed with `prefix`), and the pairs refused, with why."""
    groups: list[ScaleGroup] = []
    refused: dict[str, str] = {}

    def norm_group(norm_path: str | None, readers: tuple[str, ...], what: str) -> None:
        key = f"norm -> {what}"
        if norm_path is None:
            refused[key] = (f"the {arch.family} family has no norm read only by its {what} (post-norm: they read "
                            "the residual stream, which the next layers read too)")
            return
        norm = block.get_submodule(norm_path)
        weight = getattr(norm, "weight", None)
        if weight is None or weight.dim() != 1:
            refused[key] = f"{norm_path} has no elementwise weight to fold scales into"
            return
        groups.append(ScaleGroup(f"{norm_path} -> {', '.join(readers)}", [prefix + r for r in readers], norm))

    norm_group(arch.attention_norm, arch.attention_in, "attention inputs")
    norm_group(arch.mlp_norm, arch.mlp_in, "MLP inputs")

    value = block.get_submodule(arch.attention_in[-1])
    output = block.get_submodule(arch.attention_out)
    value_width = _out_features(value) // 3 if arch.fused_qkv else _out_features(value)
    rows = slice(2 * value_width, 3 * value_width) if arch.fused_qkv else None
    reader_width = _in_features(output)
    if reader_width % value_width or (reader_width != value_width and not head_dim):
        refused["value -> attention output"] = (f"{arch.attention_out} reads {reader_width} channels from "
                                                f"{value_width} value channels, not whole heads of them")
    else:
        groups.append(ScaleGroup(f"{arch.attention_in[-1]} -> {arch.attention_out}", [prefix + arch.attention_out],
                                 value, rows, reader_width // value_width, head_dim or 0))

    if arch.mlp_linear_in is None:
        refused["MLP input -> MLP output"] = (f"{arch.mlp_in[-1]} reaches {arch.mlp_out} through the activation "
                                              "function, which scales do not pass through")
    else:
        groups.append(ScaleGroup(f"{arch.mlp_linear_in} -> {arch.mlp_out}", [prefix + arch.mlp_out],
                                 block.get_submodule(arch.mlp_linear_in)))
    return groups, refused


def _shared(stat: Any, group: ScaleGroup) -> Any:
    """A statistic over the readers' channels, averaged over the reader channels one producer channel feeds."""
    if group.repeat == 1:
        return stat
    kv_heads = stat.numel() // (group.repeat * group.head_dim)
    return stat.reshape(kv_heads, group.repeat, group.head_dim).mean(1).reshape(-1)


def _expanded(scales: Any, group: ScaleGroup) -> Any:
    """Producer channel scales laid out over the readers' input channels."""
    if group.repeat == 1:
        return scales
    kv_heads = scales.numel() // group.head_dim
    return scales.reshape(kv_heads, 1, group.head_dim).expand(kv_heads, group.repeat, group.head_dim).reshape(-1)


def _rounding_error(weight: Any, hessian: Any, scales: Any, round_weight: RoundWeight) -> float:
    """trace(E H E^T) of the weight [out, in] rounded after its input channels are multiplied by `scales`,
    seen in the original coordinates (the rounded weight divided back)."""
    scaled_gram = hessian / scales[:, None] / scales[None, :]  # the scaled layer's inputs are x / s
    error = weight - round_weight(weight * scales, scaled_gram) / scales
    return float(((error @ hessian) * error).sum())


def search_scales(group: ScaleGroup, weights: dict[str, Any], hessians: dict[str, Any],
                  round_weight: dict[str, RoundWeight]) -> tuple[float, Any, float, float]:
    """The alpha whose scales give the group's readers the least summed output error when each reader is
    rounded by its `round_weight` (weight [out, in], Gram matrix of its inputs -> rounded weight): (alpha,
    producer channel scales, that error, the error without scales). `weights` [out, in] and `hessians`
    [in, in] by reader name."""
    import torch

    energy = sum(torch.diagonal(hessians[name]) for name in group.readers)
    rms = _shared(energy.clamp(min=0).sqrt(), group)
    # a channel (nearly) silent in calibration may not be at inference: it is not made more than 1000x quieter
    rms = rms.clamp(min=max(float(rms.max()) * 1e-3, 1e-12))
    tried: dict[float, tuple[Any, float]] = {}

    def score(alpha: float) -> None:
        scales = rms**alpha
        scales = scales / (scales.max() * scales.min()).sqrt()  # geometric middle at 1: values stay in range
        over_inputs = _expanded(scales, group)
        tried[alpha] = (scales, sum(_rounding_error(weights[n], hessians[n], over_inputs, round_weight[n])
                                    for n in group.readers))

    for alpha in COARSE_ALPHAS:
        score(alpha)
    coarse = min(tried, key=lambda a: tried[a][1])
    for alpha in (round(coarse - 0.1, 1), round(coarse + 0.1, 1)):
        if 0.0 <= alpha <= 1.0:
            score(alpha)
    best = min(tried, key=lambda a: (tried[a][1], a))
    return best, tried[best][0], tried[best][1], tried[0.0][1]


def fold(group: ScaleGroup, scales: Any, readers: dict[str, Any]) -> Any:
    """Multiply the readers' input channels by the scales and divide the producer's output channels by them:
    the float model computes what it did. Returns the scales over the readers' input channels."""
    import torch

    over_inputs = _expanded(scales, group)
    with torch.no_grad():
        producer = group.producer
        rows = group.rows or slice(None)
        inverse = (1.0 / scales)
        if is_conv1d(producer):
            producer.weight[:, rows] *= inverse.to(producer.weight.dtype)
        elif producer.weight.dim() == 1:  # a norm's elementwise weight (and a LayerNorm's bias)
            producer.weight[rows] *= inverse.to(producer.weight.dtype)
        else:
            producer.weight[rows] *= inverse.to(producer.weight.dtype)[:, None]
        if getattr(producer, "bias", None) is not None:
            producer.bias[rows] *= inverse.to(producer.bias.dtype)
        for name in group.readers:
            layer = readers[name]
            if is_conv1d(layer):
                layer.weight *= over_inputs.to(layer.weight.dtype)[:, None]
            else:
                layer.weight *= over_inputs.to(layer.weight.dtype)
    return over_inputs

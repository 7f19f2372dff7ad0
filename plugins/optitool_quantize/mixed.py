"""Mixed precision: which layers keep 8 bits when the rest go to 4, from measured sensitivity under a size target.

llama.cpp's `--target-bpw` chooses per-tensor types from an importance estimate; here each covered layer's
sensitivity is measured on the user's own calibration data: the KL divergence of the model's next-token (or
class) distribution when that layer alone is rounded to 4 bits, every other layer float. The layers that cost
the most KL per parameter get 8 bits, as many as the target average allows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def sibling_groups(module: Any, layers: dict[str, Any], batch: dict[str, Any], device: str = "cpu") -> list[list[str]]:
    """The layers grouped by the input tensor they read (a block's q/k/v, a gated MLP's gate/up): exporters pack
    such siblings into one MatMul (onnxruntime-genai's builder does q/k/v), which has one bit width, so a plan
    that gave them different bits would be stored in the wider one and overshoot its size target."""
    import torch

    from optitool import call_module, inputs_for

    read: dict[str, Any] = {}  # layer -> its first input, kept alive so no two inputs share an id

    def hook(name: str) -> Callable[..., None]:
        def keep(_module: Any, args: tuple[Any, ...]) -> None:
            read.setdefault(name, args[0])

        return keep

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            call_module(module, inputs_for(module, batch, device))
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name in layers:
        groups.setdefault(id(read[name]) if name in read else id(name), []).append(name)
    return list(groups.values())


def layer_sensitivity(module: Any, layers: dict[str, Any], groups: list[list[str]], batches: list[dict[str, Any]],
                      *, bits: int, block_size: int, symmetric: bool, transposed: set[str], device: str = "cpu",
                      done: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Per group of layers (named by its members joined with " + "), the mean KL(float model || model with only
    this group rounded to nearest in `bits`) over the calibration batches' positions; `done` is called after
    each group (one forward pass per batch each)."""
    import torch

    from optitool import call_module, inputs_for, main_output
    from optitool_quantize.grids import round_to_grid

    def log_probs(batch: dict[str, Any]) -> Any:
        name, out = main_output(call_module(module, inputs_for(module, batch, device)))
        if name != "logits":
            from optitool import PassError

            raise PassError(f"bits_per_weight measures each layer's effect on the model's logits; this model's "
                            f"main output is {name!r}")
        return torch.log_softmax(out.float(), -1)

    with torch.inference_mode():
        reference = [log_probs(b) for b in batches]
    found = {}
    for group in groups:
        originals = {name: layers[name].weight.data.clone() for name in group}
        try:
            for name, original in originals.items():
                weight = original.t() if name in transposed else original
                rounded, _, _ = round_to_grid(weight.float(), bits, block_size, symmetric)
                layers[name].weight.data.copy_((rounded.t() if name in transposed else rounded).to(original.dtype))
            with torch.inference_mode():
                total, count = 0.0, 0
                for batch, ref in zip(batches, reference, strict=True):
                    kl = (ref.exp() * (ref - log_probs(batch))).sum(-1)
                    total, count = total + float(kl.sum()), count + kl.numel()
            found[" + ".join(group)] = total / max(count, 1)
        finally:
            for name, original in originals.items():
                layers[name].weight.data.copy_(original)
        done()
    return found


def plan_bits(parameters: dict[str, int], sensitivity: dict[str, float], target: float, low: int = 4,
              high: int = 8) -> dict[str, int]:
    """Bits per layer whose parameter-weighted average is at most `target`: layers are raised from `low` to
    `high` in order of sensitivity per parameter, each as long as the average stays within the target (a layer
    too large to fit is passed over for smaller ones after it)."""
    total = sum(parameters.values())
    budget = (target - low) * total  # the extra code bits the target allows
    plan = dict.fromkeys(parameters, low)
    for name in sorted(parameters, key=lambda n: sensitivity.get(n, 0.0) / parameters[n], reverse=True):
        cost = (high - low) * parameters[name]
        if cost <= budget + 1e-9:
            plan[name] = high
            budget -= cost
    return plan


def average_bits(parameters: dict[str, int], plan: dict[str, int]) -> float:
    return sum(parameters[n] * plan[n] for n in parameters) / sum(parameters.values())

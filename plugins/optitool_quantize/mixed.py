"""Mixed precision: which layers keep 8 bits when the rest go to 4, from measured sensitivity under a size target.

llama.cpp's `--target-bpw` chooses per-tensor types from an importance estimate; here each covered layer's
sensitivity is measured on the user's own calibration data: the KL divergence of the model's next-token (or
class) distribution when that layer alone is rounded to 4 bits, every other layer float. The layers that cost
the most KL per parameter get 8 bits, as many as the target average allows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def layer_sensitivity(module: Any, layers: dict[str, Any], batches: list[dict[str, Any]], *, bits: int,
                      block_size: int, symmetric: bool, transposed: set[str], device: str = "cpu",
                      done: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Per layer, the mean KL(float model || model with only this layer rounded to nearest in `bits`) over the
    calibration batches' positions; `done` is called after each layer (one forward pass per batch each)."""
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
    for name, layer in layers.items():
        original = layer.weight.data.clone()
        weight = original.t() if name in transposed else original
        rounded, _, _ = round_to_grid(weight.float(), bits, block_size, symmetric)
        layer.weight.data.copy_((rounded.t() if name in transposed else rounded).to(original.dtype))
        try:
            with torch.inference_mode():
                total, count = 0.0, 0
                for batch, ref in zip(batches, reference, strict=True):
                    kl = (ref.exp() * (ref - log_probs(batch))).sum(-1)
                    total, count = total + float(kl.sum()), count + kl.numel()
            found[name] = total / max(count, 1)
        finally:
            layer.weight.data.copy_(original)
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

"""Data-aware weight rounding on torch models: `gptq` and `imatrix`.

Both leave every covered weight on integer block grids (`scale * (code - zero)`, see grids.py) and change
nothing else, so the model still runs in torch (its quality is measured as the deployed 4-bit model's) and
`weight_only_quantize` with grid = "source" stores exactly those grids after the ONNX export. They differ in
how a weight is rounded, given the calibration inputs of its layer:
- `imatrix`: each block's grid searched to minimise the error its inputs see (the block's part of the inputs'
  Gram matrix: each channel's activation energy, as llama.cpp's importance matrix, and their correlations);
  each weight still rounded to its nearest level;
- `gptq`: columns rounded one at a time, each one's error spread over the columns not yet rounded by the
  inverse of the inputs' Gram matrix (GPTQ), on min/max or searched grids.
Blocks are calibrated one after another (`optitool.calibration.sequential_blocks`): a block sees the outputs
of the blocks before it as already rounded, and only one block's statistics are held at a time.
"""

from __future__ import annotations

import fnmatch
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from optitool import Pass, PassConfig, PassContext, PassError, TorchModel, is_conv1d
from optitool_quantize.nbits import BlockSize

DEFAULT_EXCLUDE = ["*lm_head*", "*classifier*", "*score*", "*pooler*"]


class GridConfig(PassConfig):
    bits: Literal[4, 8] = Field(4, description="bits per weight")
    block_size: BlockSize = Field(32, description="input channels sharing one scale and zero point (a power "
                            "of 2; weight_only_quantize must use the same)")
    symmetric: bool = Field(False, description="zero point fixed at the middle code (no zero points stored)")
    awq: bool = Field(False, description="activation-aware scales first (AWQ): the input channels of the layers "
                      "that read one norm's output (and value -> attention output, up -> down projection) are "
                      "multiplied by their calibration RMS to a power searched from 0 to 1 per group, the inverse "
                      "folded into the norm or projection before them (exact in float), so loud channels get finer "
                      "steps; needs a known transformer layout")
    calibration_samples: int = Field(32, ge=1, description="calibration token blocks (causal LMs) or examples")
    include: list[str] = Field(default_factory=lambda: ["*"], description="module name patterns covered")
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE),
                               description="module name patterns left in float (the head by default)")
    bits_per_weight: float | None = Field(
        None, ge=4, le=8, description="with bits = 4: mixed precision, the average code bits of the covered weights "
        "(scales and zero points not counted); the layers whose rounding costs the most KL on the calibration "
        "split per parameter keep 8 bits, as many as this allows")
    sensitivity_samples: int | None = Field(
        None, ge=1, description="with bits_per_weight: the calibration token blocks (the first ones) each layer's KL "
        "is measured on, 4 (or every block, when fewer) unless set; every group of covered layers that read one "
        "input costs one forward pass per block (SmolLM2-135M's 121 groups, 4 blocks of 256 tokens: about 3 min "
        "on 2 cores)")

    @model_validator(mode="after")
    def _mixed(self) -> GridConfig:
        if self.bits_per_weight is not None and self.bits != 4:
            raise ValueError(f"bits_per_weight has no effect with bits = {self.bits}: it mixes 4- and 8-bit layers")
        if self.sensitivity_samples is not None and self.bits_per_weight is None:
            raise ValueError("sensitivity_samples has no effect without bits_per_weight (it measures the layers a "
                             "mixed plan chooses from)")
        if (self.sensitivity_samples or 0) > self.calibration_samples:
            raise ValueError(f"sensitivity_samples = {self.sensitivity_samples} is more than the "
                             f"calibration_samples = {self.calibration_samples} it is taken from")
        return self



class GridQuantize(Pass):
    """What the data-aware passes share: calibration, the block-by-block walk, the covered layers, the
    comparison with round to nearest that every stage reports. A subclass says how one weight is rounded."""

    keeps_widths = True

    compresses = True
    takes = "torch"
    gives = "torch"
    Config = GridConfig

    def data_needs(self) -> dict[str, str]:
        return {"calibration": "inputs"}

    def check_widths(self, widths: dict[str, int]) -> None:
        """Every covered layer's input width must be whole blocks (the grids are per block of input channels).
        With the default coverage the covered layers are the blocks' projections, whose widths the model's
        files declare; a narrowed include/exclude is checked when the layers are known."""
        from optitool import ConfigError
        from optitool_quantize.nbits import largest_dividing_block

        cfg: GridConfig = self.config
        if cfg.include != ["*"]:
            return
        for role, width in widths.items():
            if width % cfg.block_size:
                fits = largest_dividing_block(widths)
                raise ConfigError(f"block_size = {cfg.block_size} does not divide the model's {role} width {width} "
                                  f"(the input width of its {role} projections, read from its files); "
                                  + (f"block_size = {fits} divides every width it has" if fits else
                                     "no block size from 16 up divides them all"))

    def round_weight(self, weight: Any, hessian: Any, bits: int) -> Any:  # pragma: no cover - abstract
        """`weight` [out, in] on its `bits`-bit grids, given its inputs' Gram matrix [in, in]."""
        raise NotImplementedError

    def scale_search_rounding(self, bits: int) -> Any:
        """How awq's scale search rounds a weight (given the Gram matrix of its inputs) to score a scaling: this
        method's rounding, or a cheaper stand-in for it."""
        from optitool_quantize.grids import round_to_grid

        cfg: GridConfig = self.config
        return lambda weight, gram: round_to_grid(weight, bits, cfg.block_size, cfg.symmetric, importance=gram)[0]

    def _plan(self, model: TorchModel, batches: list[dict[str, Any]], ctx: PassContext,
              layout: Any) -> dict[str, int]:
        """Bits per covered layer: `bits` for all, or the measured 4/8 mix under bits_per_weight."""
        from optitool import first_rows, row_count
        from optitool_quantize.mixed import average_bits, layer_sensitivity, plan_bits, sibling_groups

        cfg: GridConfig = self.config
        layers = self._layers(model.module, "")
        self._check(layers)
        if cfg.bits_per_weight is None:
            return dict.fromkeys(layers, cfg.bits)
        transposed = {n for n, layer in layers.items() if is_conv1d(layer)}
        measured_on = first_rows(batches, cfg.sensitivity_samples or 4)
        groups = sibling_groups(model.module, layers, first_rows(batches, 1)[0], ctx.device)
        with ctx.progress(len(groups), f"{self.name}: sensitivity of each layer") as progress:
            sensitivity = layer_sensitivity(model.module, layers, groups, measured_on, bits=4,
                                            block_size=cfg.block_size, symmetric=cfg.symmetric, transposed=transposed,
                                            device=ctx.device, done=lambda: progress.update(1))
        members = {" + ".join(group): group for group in groups}
        sizes = {key: sum(layers[n].weight.numel() for n in group) for key, group in members.items()}
        grouped = plan_bits(sizes, sensitivity, cfg.bits_per_weight)
        plan = {name: grouped[key] for key, group in members.items() for name in group}
        ctx.metrics.update(bits_per_weight=round(average_bits(sizes, grouped), 4),
                           sensitivity_samples=sum(row_count(b) for b in measured_on),
                           layers_in_8_bits=sorted(n for n, b in plan.items() if b == 8),
                           layer_sensitivity={n: float(f"{v:.4g}") for n, v in sensitivity.items()})
        return plan

    def run(self, model: TorchModel, ctx: PassContext) -> TorchModel:
        import torch

        from optitool import calibration_batches, observe_inputs, sequential_blocks

        cfg: GridConfig = self.config
        module = model.module
        batches = calibration_batches(model, ctx, cfg.calibration_samples, why=f"{self.name}")
        try:
            layout = ctx.architecture(module)
        except PassError:
            layout = None  # no known blocks: every covered layer is calibrated in one pass over the model
        started = time.perf_counter()
        plan = self._plan(model, batches, ctx, layout)
        errors: dict[str, tuple[float, float]] = {}
        scaling = _Scaling(self, layout) if cfg.awq else None
        if layout is None:
            layers = self._layers(module, "")
            hessians = _Gram()
            observe_inputs(module, layers, batches, hessians.add, device=ctx.device)
            self._round_all(layers, hessians, errors, plan)
        else:
            with ctx.progress(len(layout.blocks), f"{self.name}: blocks") as progress, torch.no_grad():
                for feed in sequential_blocks(module, layout, batches, device=ctx.device):
                    layers = self._layers(feed.block, f"{layout.blocks_path}.{feed.index}.")
                    if layers:
                        hessians = _Gram()
                        feed.observe(layers, hessians.add)
                        scales = scaling.apply(feed.block, f"{layout.blocks_path}.{feed.index}.", layers, hessians,
                                               plan) if scaling else {}
                        self._round_all(layers, hessians, errors, plan, scales)
                    progress.update(1)
            # Covered layers outside the blocks (the LM head, when `exclude` lets it in) see the rounded blocks'
            # outputs: one more pass over the calibration batches, the blocks already rounded.
            outside = {n: m for n, m in self._layers(module, "").items() if not n.startswith(f"{layout.blocks_path}.")}
            if outside:
                hessians = _Gram()
                observe_inputs(module, outside, batches, hessians.add, device=ctx.device)
                self._round_all(outside, hessians, errors, plan)
        if scaling is not None:
            ctx.metrics.update(scaling.metrics())
        ours = sum(e[0] for e in errors.values())
        nearest = sum(e[1] for e in errors.values())
        ctx.metrics.update(
            quantized_layers=len(errors), bits=cfg.bits, block_size=cfg.block_size, symmetric=cfg.symmetric,
            grid_seconds=round(time.perf_counter() - started, 2),
            weighted_error_vs_nearest=round(ours / nearest, 4) if nearest else None,
            layer_error_vs_nearest={name: round(e[0] / e[1], 4) if e[1] else None for name, e in errors.items()})
        return model

    def _layers(self, block: Any, prefix: str) -> dict[str, Any]:
        import torch

        cfg: GridConfig = self.config
        out = {}
        for name, sub in block.named_modules():
            full = prefix + name
            if not (isinstance(sub, torch.nn.Linear) or is_conv1d(sub)):
                continue
            if any(fnmatch.fnmatch(full, p) for p in cfg.include) and not any(
                    fnmatch.fnmatch(full, p) for p in cfg.exclude):
                out[full] = sub
        return out

    def _check(self, layers: dict[str, Any]) -> None:
        cfg: GridConfig = self.config
        if not layers:
            raise PassError(f"{self.name}: no Linear or Conv1D layer matches include={cfg.include} "
                            f"exclude={cfg.exclude}")

    def _round_all(self, layers: dict[str, Any], hessians: _Gram, errors: dict[str, tuple[float, float]],
                   plan: dict[str, int], scales: dict[str, Any] | None = None) -> None:
        """Round every layer; `errors` gets, per layer, its error and round to nearest's on the weight as it was
        before any channel scaling (`scales`: what its input channels were multiplied by)."""
        from optitool_quantize.grids import round_to_grid, weighted_error
        cfg: GridConfig = self.config
        for name, layer in layers.items():
            if name not in hessians.sums:
                raise PassError(f"{self.name}: {name} saw no input during calibration (a layer the forward pass "
                                "does not use); exclude it")
            transposed = is_conv1d(layer)
            weight = layer.weight.detach().float()
            weight = weight.t() if transposed else weight  # [out, in]
            if weight.shape[1] % cfg.block_size:
                raise PassError(f"{self.name}: {name} has {weight.shape[1]} input channels, not a multiple of "
                                f"block_size {cfg.block_size}; choose a block_size that divides it or exclude it")
            hessian = hessians.matrix(name)
            rounded = self.round_weight(weight, hessian, plan[name])
            s = (scales or {}).get(name)
            before, seen = (weight, hessian) if s is None else (weight / s, hessian * s[:, None] * s[None, :])
            nearest, _, _ = round_to_grid(before, plan[name], cfg.block_size, cfg.symmetric)
            errors[name] = (weighted_error(weight, rounded, hessian), weighted_error(before, nearest, seen))
            layer.weight.data.copy_((rounded.t() if transposed else rounded).to(layer.weight.dtype))


class _Scaling:
    """AWQ-style scales block by block: searched on the block's calibration Gram matrices, folded into the
    model, and the Gram matrices changed to what the scaled layers will see (x / s)."""

    def __init__(self, owner: GridQuantize, layout: Any) -> None:
        if layout is None:
            raise PassError(f"{owner.name}: awq = true needs a transformer layout optitool knows (its norms and "
                            "projections by role); this model has none")
        self.layout, self.scale_search_rounding = layout, owner.scale_search_rounding
        try:  # grouped-query value heads are laid out by it; a family without one folds no value -> output
            self.head_dim: int | None = layout.head_dim()
        except PassError:
            self.head_dim = None
        self.alphas: dict[str, float] = {}
        self.refused: dict[str, str] = {}
        self.gain: list[tuple[float, float]] = []

    def apply(self, block: Any, prefix: str, layers: dict[str, Any], hessians: _Gram,
              plan: dict[str, int]) -> dict[str, Any]:
        from dataclasses import replace

        from optitool_quantize.scaling import fold, scale_groups, search_scales

        groups, refused = scale_groups(block, prefix, self.layout.architecture, self.head_dim)
        self.refused.update(refused)
        chosen = []
        for group in groups:
            covered = [n for n in group.readers if n in layers and n in hessians.sums]
            if not covered:
                continue
            weights = {n: layers[n].weight.detach().float().t() if is_conv1d(layers[n]) else
                       layers[n].weight.detach().float() for n in covered}
            grams = {n: hessians.matrix(n) for n in covered}
            # only the covered readers' rounding is weighed (the others are scaled too, exactly, in float)
            rounders = {n: self.scale_search_rounding(plan[n]) for n in covered}
            alpha, producer_scales, error, plain = search_scales(replace(group, readers=covered), weights, grams,
                                                                 rounders)
            self.alphas[prefix + group.name] = alpha
            self.gain.append((error, plain))
            chosen.append((group, producer_scales))
        scales: dict[str, Any] = {}
        for group, producer_scales in chosen:  # after every search: each saw the block as it was
            over_inputs = fold(group, producer_scales, {n: block.get_submodule(n[len(prefix):])
                                                        for n in group.readers})
            for name in group.readers:
                scales[name] = over_inputs
                if name in hessians.sums:  # the inputs the scaled layer sees are x / s
                    inverse = (1.0 / over_inputs).double()
                    hessians.sums[name] = hessians.sums[name] * inverse[:, None] * inverse[None, :]
        return scales

    def metrics(self) -> dict[str, Any]:
        error = sum(e for e, _ in self.gain)
        plain = sum(p for _, p in self.gain)
        return {"awq_groups": len(self.alphas), "awq_alpha": self.alphas,
                "awq_refused": dict(sorted(self.refused.items())),
                "awq_error_vs_unscaled": round(error / plain, 4) if plain else None}


class _Gram:
    """Per layer, the sum of x^T x over calibration tokens and their count."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, x: Any) -> None:
        x = x.double()
        self.sums[name] = self.sums.get(name, 0) + x.T @ x
        self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

    def matrix(self, name: str) -> Any:
        return (self.sums[name] / max(self.tokens[name], 1)).float()


class ImatrixConfig(GridConfig):
    pass


class Imatrix(GridQuantize):
    """Round weights to nearest on block grids searched against each input channel's activation energy."""

    name = "imatrix"
    Config = ImatrixConfig

    def round_weight(self, weight: Any, hessian: Any, bits: int) -> Any:
        from optitool_quantize.grids import round_to_grid

        cfg: ImatrixConfig = self.config
        rounded, _, _ = round_to_grid(weight, bits, cfg.block_size, cfg.symmetric, importance=hessian)
        return rounded


class GptqConfig(GridConfig):
    damping: float = Field(0.01, gt=0, le=1, description="added to H's diagonal, as a fraction of its mean")
    search_grid: bool = Field(True, description="each block's grid searched against the channels' activation "
                              "energy (as imatrix) rather than spanning its min and max")
    act_order: bool = Field(False, description="round the loudest input channels first (grids fixed beforehand, "
                            "per block of channels, as MatMulNBits stores them)")


class Gptq(GridQuantize):
    """GPTQ: round weights column by column, compensating each error on the columns not yet rounded."""

    name = "gptq"
    Config = GptqConfig

    def round_weight(self, weight: Any, hessian: Any, bits: int) -> Any:
        from optitool_quantize.gptq import gptq

        cfg: GptqConfig = self.config
        rounded, _, _ = gptq(weight, hessian, bits=bits, block_size=cfg.block_size, symmetric=cfg.symmetric,
                             damping=cfg.damping, search=cfg.search_grid, act_order=cfg.act_order)
        return rounded

"""Calibration data for passes that look at activations: the batches, what each layer's input looks like, and
a block-by-block driver.

Wanda needs each layer's input energy (a sum of squares), GPTQ its input Gram matrix (a Hessian), an
importance-weighted grid the diagonal of it. They all observe the same thing, a layer's inputs over calibration
data, with a different accumulator, so the observing lives here once. A compressor that changes weights should
see, in each block, the inputs the already compressed blocks before it give (llm-compressor's sequential
pipeline, GPTQ's reference code): `sequential_blocks` runs the model up to its first block once, then feeds
each block's outputs, computed after the caller changed it, to the next, so no algorithm holds every layer's
statistics at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from optitool.errors import PassError

if TYPE_CHECKING:
    import torch

    from optitool.architectures import Layout
    from optitool.artifacts import ModelArtifact
    from optitool.passes import PassContext

Accumulate = Callable[[str, "torch.Tensor"], None]  # (layer name, its input as [tokens, features])


def calibration_batches(model: ModelArtifact, ctx: PassContext, samples: int, *, why: str) -> list[dict[str, Any]]:
    """The calibration split as model inputs: for a causal LM, blocks of `max_length` real tokens (4 a batch),
    at most `samples` blocks; otherwise batches of 8 examples, at most `samples` examples.

    A pass that needs data must never calibrate on something else silently: no calibration split, or text too
    short to fill one token block, is an error naming `why` the pass needs it."""
    from optitool.lm import BLOCK_BATCH, is_causal_lm, real_token_blocks

    if ctx.inputs is None or not ctx.inputs.has_split("calibration"):
        raise PassError(f"{why} needs a calibration split: add one to [data] splits (e.g. calibration = 32)")
    if is_causal_lm(model):
        length = ctx.inputs.max_length
        blocks = real_token_blocks(ctx.inputs, "calibration", length)
        if not blocks:
            raise PassError(f"{why}: the calibration split's text is shorter than one block of {length} tokens "
                            "([model].max_length); give the split more text or lower max_length")
        batches = [b.inputs for b in blocks][: max(1, -(-samples // BLOCK_BATCH))]
    else:
        batches = [b.inputs for b in ctx.inputs.batches("calibration", 8, limit=samples)]
        if not batches:
            raise PassError(f"{why}: the calibration split is empty")
    ctx.metrics["calibration_batches"] = len(batches)
    return batches


def first_rows(batches: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The first `count` rows (token blocks or examples) of `batches`, the last batch cut where needed: a
    measurement that costs a forward pass per row takes fewer rows than the calibration itself."""
    taken, left = [], count
    for batch in batches:
        if left <= 0:
            break
        rows = row_count(batch)
        taken.append(batch if rows <= left else {k: v[:left] if hasattr(v, "shape") else v for k, v in batch.items()})
        left -= rows
    return taken


def row_count(batch: dict[str, Any]) -> int:
    """How many token blocks or examples a batch of model inputs holds (its tensors' first dimension)."""
    return next(v.shape[0] for v in batch.values() if hasattr(v, "shape"))


def observe_inputs(module: Any, layers: dict[str, Any], batches: list[dict[str, Any]], accumulate: Accumulate,
                   *, device: str = "cpu") -> None:
    """Run `batches` through `module` without gradients; for every layer in `layers` (name -> module) call
    `accumulate(name, x)` with the input it was given, flattened to [tokens, features] in float32."""
    import torch

    from optitool.execution import call_module, inputs_for

    with watching(layers, accumulate), torch.inference_mode():
        for batch in batches:
            call_module(module, inputs_for(module, batch, device))


class watching:
    """Forward hooks that hand each layer's input to `accumulate` while the block is open."""

    def __init__(self, layers: dict[str, Any], accumulate: Accumulate) -> None:
        self.layers, self.accumulate, self.hooks = layers, accumulate, []

    def __enter__(self) -> watching:
        for name, layer in self.layers.items():
            def record(_: Any, args: tuple[Any, ...], name: str = name) -> None:
                x = args[0].detach().float()
                self.accumulate(name, x.reshape(-1, x.shape[-1]))
            self.hooks.append(layer.register_forward_pre_hook(record))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self.hooks:
            hook.remove()


class _Stop(Exception):
    """Raised by the hook on the first block once its inputs are captured: the rest of the model is not run."""


class BlockFeed:
    """One block and the inputs the blocks before it gave, for every calibration batch."""

    def __init__(self, index: int, block: Any, inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
        self.index, self.block, self._inputs = index, block, inputs

    def observe(self, layers: dict[str, Any], accumulate: Accumulate) -> None:
        """Run the block on every input with `layers` (modules inside it) watched."""
        import torch

        with watching(layers, accumulate), torch.inference_mode():
            for args, kwargs in self._inputs:
                self.block(*args, **kwargs)

    def outputs(self) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        """The next block's inputs: this block's output hidden state in place of its input one."""
        import torch

        out = []
        with torch.inference_mode():
            for args, kwargs in self._inputs:
                result = self.block(*args, **kwargs)
                hidden = result[0] if isinstance(result, tuple | list) else result
                if args:
                    out.append(((hidden, *args[1:]), kwargs))
                else:
                    out.append(((), {**kwargs, "hidden_states": hidden}))
        return out


def sequential_blocks(module: Any, layout: Layout, batches: list[dict[str, Any]], *,
                      device: str = "cpu") -> Iterator[BlockFeed]:
    """Yield each block of `layout` with its inputs, first to last. A block's outputs are computed when the
    caller asks for the next one, so they reflect whatever the caller did to the block meanwhile."""
    import torch

    from optitool.execution import call_module, inputs_for

    blocks = layout.blocks
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def capture(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    hook = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                feed = inputs_for(module, batch, device)
                try:
                    call_module(module, {**feed, "use_cache": False} if "input_ids" in feed else feed)
                except _Stop:
                    pass
    finally:
        hook.remove()
    if len(captured) != len(batches):
        raise PassError(f"the model's first block ({layout.blocks_path}.0) did not run on every calibration batch")
    inputs = captured
    for index, block in enumerate(blocks):
        feed = BlockFeed(index, block, inputs)
        yield feed
        if index + 1 < len(blocks):
            inputs = feed.outputs()

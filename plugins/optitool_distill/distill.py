"""The distill pass: a student learns from a teacher (the model entering the pass, or a named stage).

With `alpha = 0` it is plain supervised fine-tuning on the labels, which is how the examples build the
classifier they then compress.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Literal

from pydantic import Field

from optitool import (
    Batch,
    Pass,
    PassConfig,
    PassContext,
    PassError,
    TorchModel,
    call_module,
    inputs_for,
    is_causal_lm,
    keep_blocks,
    main_output,
    pooled,
    token_blocks,
    torchrun_world,
)


class DistillConfig(PassConfig):
    teacher: str = Field("auto", description="'auto': the model before the first compression pass of the chain "
                         "(pruning, quantization) when one ran before this pass, else the model entering it; "
                         "'previous' (the model entering the pass) or a stage name")
    student: Literal["same", "layers", "model"] = Field(
        "same", description="same model (keeps pruning masks), a shallower copy (layers = N), or [student_model]")
    layers: int | None = Field(None, ge=1, description="with student = 'layers': blocks kept (evenly spaced "
                               "teacher blocks, first and last included)")
    student_model: dict[str, Any] | None = Field(None, description="with student = 'model': a [model]-style table")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(16, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the teacher loss; 1 - alpha goes to the labels")
    output_loss: Literal["auto", "kl", "mse", "cosine"] = Field(
        "auto", description="auto: KL on logits, cosine on embeddings")
    hidden_weight: float = Field(0.0, ge=0, description="weight of hidden-state matching (same widths only)")
    mixed_precision: bool = Field(True, description="bf16 autocast on CUDA")
    processes: int = Field(1, ge=1, description="train on this many processes (torchrun, DistributedDataParallel: "
                           "gloo on CPU, nccl on CUDA), each on its share of every batch; under torchrun already, "
                           "its world size is used")
    keep_best: bool = Field(True, description="keep the best of the starting student and each epoch (eval score)")


def _shallow_copy(teacher: TorchModel, layers: int, ctx: PassContext) -> tuple[Any, list[int]]:
    """A student with `layers` blocks, initialised from evenly spaced teacher blocks (first and last kept),
    for any family whose layout the architecture registry knows."""
    student = copy.deepcopy(teacher.module)
    layout = ctx.architecture(student)
    total = len(layout.blocks)
    if layers >= total:
        raise PassError(f"layers = {layers}, but the teacher has only {total} blocks")
    keep = sorted({round(i * (total - 1) / (layers - 1)) for i in range(layers)}) if layers > 1 else [total - 1]
    keep_blocks(layout, keep)
    return student, keep


def _combine(masks: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(masks)
    for name, mask in new.items():
        out[name] = out[name] & mask.to(out[name].device) if name in out else mask
    return out


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _distributed(module: Any, device: str) -> Any:
    """The student wrapped for DistributedDataParallel (the process group started on first use)."""
    import os

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(_backend(device))
    return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)


def _share(batch: Batch, rank: int, size: int) -> Batch | None:
    """This rank's rows of a batch (rank, rank + size, ...): the ranks' gradients, averaged, are the whole
    batch's, so N processes train like one on the same batches."""
    if size == 1:
        return batch
    rows = len(next(iter(batch.inputs.values())))
    if rows < size:
        return None
    inputs = {k: v[rank::size] for k, v in batch.inputs.items()}
    return Batch(inputs, batch.labels[rank::size] if batch.labels is not None else None)


def _mean_over_ranks(value: Any, size: int) -> float:
    if size > 1:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value /= size
    return float(value)


class Distill(Pass):
    """Distil the model into a student (same, shallower, or named), keeping pruning masks."""

    name = "distill"
    Config = DistillConfig
    takes = "torch"
    gives = "torch"

    def data_needs(self) -> dict[str, str]:
        return {"train": "labels" if self.config.alpha == 0 else "inputs"}

    def processes(self) -> int:
        return self.config.processes

    def _student(self, model: TorchModel, ctx: PassContext) -> TorchModel:
        cfg: DistillConfig = self.config
        if cfg.student == "same":
            return TorchModel(copy.deepcopy(model.module), origin=model.origin, tokenizer=model.tokenizer,
                              input_names=model.input_names, overrides=copy.deepcopy(model.overrides),
                              masks=dict(model.masks))
        if cfg.student == "layers":
            if not cfg.layers:
                raise PassError("student = 'layers' needs layers = N")
            module, kept = _shallow_copy(model, cfg.layers, ctx)
            ctx.metrics["student_layers_from_teacher"] = kept
            return TorchModel(module, origin=model.origin, tokenizer=model.tokenizer, input_names=model.input_names,
                              overrides=copy.deepcopy(model.overrides))
        if not cfg.student_model or ctx.load_model is None:
            raise PassError("student = 'model' needs student_model = { source = ..., ... }")
        loaded = ctx.load_model(cfg.student_model)
        if not isinstance(loaded, TorchModel):
            raise PassError("the student model must be a torch model")
        return loaded

    def stages_named(self) -> dict[str, str]:
        name = self.config.teacher
        return {} if name in ("auto", "previous") else {"teacher": name}

    def _teacher(self, model: TorchModel, ctx: PassContext) -> TorchModel:
        """Distilling a pruned model from itself teaches nothing: by default the teacher is the model as it
        was before the chain's first compression pass."""
        name = self.config.teacher
        if name == "auto":
            before = ctx.before_compression
            if isinstance(before, TorchModel):
                ctx.metrics["teacher"] = next((n for n, a in ctx.stages.items() if a is before), "before compression")
                return before
            ctx.metrics["teacher"] = next(reversed(ctx.stages), "previous")
            return model
        if name == "previous":
            return model
        if name not in ctx.stages:
            raise PassError(f"teacher = {name!r} is not an earlier stage; earlier stages: {', '.join(ctx.stages)}")
        teacher = ctx.stages[name]
        if not isinstance(teacher, TorchModel):
            raise PassError(f"teacher stage {name!r} is not a torch model")
        return teacher

    def run(self, model: TorchModel, ctx: PassContext) -> TorchModel:
        import torch

        cfg: DistillConfig = self.config
        if ctx.inputs is None or not ctx.inputs.has_split("train"):
            raise PassError("distill needs a train split: add [data] with a source and [data.splits] train = ...")
        teacher, student = self._teacher(model, ctx), self._student(model, ctx)
        device = ctx.device
        teacher.module.to(device).eval()
        student.module.to(device).train()
        masks = {k: v.to(device) for k, v in student.masks.items()}
        params = dict(student.module.named_parameters())
        # Masks are looked up under every name a tensor has: a tied LM head's mask is keyed "lm_head.weight",
        # a name named_parameters() leaves out (it lists the embedding once), and was silently dropped
        every = dict(student.module.named_parameters(remove_duplicate=False))
        dropped = sorted(k for k, v in masks.items() if k not in every or every[k].shape != v.shape)
        masks = {k: v for k, v in masks.items() if k not in dropped}
        if dropped:
            ctx.metrics["masks_dropped"] = dropped
            ctx.logger.warning("pruning masks dropped: the student has no weight of that name and shape: %s",
                               ", ".join(dropped))
        causal = is_causal_lm(student)
        train_batches = self._train_batches(ctx, causal)
        rank, size = torchrun_world()
        trained = _distributed(student.module, device) if size > 1 else student.module
        steps_per_epoch = math.ceil(len(train_batches) / cfg.gradient_accumulation)
        total = min(cfg.max_steps or 10**9, steps_per_epoch * cfg.epochs)
        decay = [p for n, p in params.items() if p.dim() > 1]
        no_decay = [p for n, p in params.items() if p.dim() <= 1]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(total))
        autocast = cfg.mixed_precision and device == "cuda"
        pruner = ctx.take("gradual_pruning")  # handed on by magnitude_prune(schedule = "cubic")
        if pruner is not None and cfg.student != "same":
            raise PassError("gradual pruning (magnitude_prune schedule = 'cubic') needs student = 'same'")
        if pruner is not None:
            masks = _combine(masks, pruner.update(student.module, 0, total))
        torch.manual_seed(ctx.seed)
        step, losses, history, best, tokens = 0, [], [], (-math.inf, None, 0), 0
        if cfg.keep_best and pruner is None:  # training must beat the student it started from to replace it
            score, metric, shown = self._evaluate(teacher.module, student.module, ctx)
            history.append({"epoch": 0, "step": 0, metric: round(shown, 6)})
            best = (score, {k: v.detach().clone() for k, v in student.module.state_dict().items()}, 0)
        start = time.perf_counter()
        with ctx.progress(total, "distill") as bar:
            for epoch in range(cfg.epochs):
                if step >= total:
                    break
                for i, batch in enumerate(train_batches):
                    batch = _share(batch, rank, size)
                    if batch is None:  # fewer rows than processes: every rank skips it alike
                        continue
                    inputs = inputs_for(student.module, batch.inputs, device)
                    if "attention_mask" in inputs:
                        tokens += int(inputs["attention_mask"].sum()) * size
                    labels = batch.labels.to(device) if batch.labels is not None and not causal else None
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                        loss = self._loss(teacher.module, trained, inputs, labels)
                    (loss / cfg.gradient_accumulation).backward()
                    if (i + 1) % cfg.gradient_accumulation:
                        continue
                    torch.nn.utils.clip_grad_norm_(student.module.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for name, mask in masks.items():
                            every[name].mul_(mask)
                    step += 1
                    if pruner is not None and pruner.due(step, total):
                        masks = _combine(masks, pruner.update(student.module, step, total))
                    losses.append(_mean_over_ranks(loss.detach(), size))
                    rate = tokens / max(time.perf_counter() - start, 1e-9)
                    bar.update(1, loss=losses[-1], epoch=epoch + 1, **({"tokens_per_s": rate} if tokens else {}))
                    if step >= total:
                        break
                score, metric, shown = self._evaluate(teacher.module, student.module, ctx)
                history.append({"epoch": epoch + 1, "step": step, metric: round(shown, 6)})
                ctx.logger.info("distill epoch %d: %s = %.4f", epoch + 1, metric, shown)
                if score > best[0]:
                    state = {k: v.detach().clone() for k, v in student.module.state_dict().items()} if cfg.keep_best else None
                    best = (score, state, epoch + 1)
        if pruner is not None:  # the best epoch may predate the final sparsity: only the final one counts
            masks = _combine(masks, pruner.update(student.module, total, total))
            ctx.metrics["gradual_final_sparsity"] = round(pruner.sparsity_at(total, total), 6)
        elif cfg.keep_best and best[1] is not None:
            student.module.load_state_dict(best[1])
        student.module.eval().cpu()
        violations = sum(int((every[n].detach().cpu()[~m.cpu()] != 0).sum()) for n, m in masks.items())
        seconds = time.perf_counter() - start
        if size > 1:
            ctx.metrics.update(distill_processes=size, distill_backend=_backend(device))
        if tokens:
            ctx.metrics["distill_tokens_per_s"] = round(tokens / max(seconds, 1e-9), 1)
        ctx.metrics.update(distill_steps=step, distill_seconds=round(seconds, 2),
                           distill_loss_first=round(losses[0], 5) if losses else None,
                           distill_loss_last=round(sum(losses[-10:]) / max(1, len(losses[-10:])), 5) if losses else None,
                           distill_history=history, distill_best_epoch=best[2], mask_violations=violations,
                           distill_selected_on=self._selection_split(ctx))
        student.masks = {k: v.cpu() for k, v in masks.items()}
        return student

    def _lr_lambda(self, total: int) -> Any:
        cfg: DistillConfig = self.config
        warm = int(total * cfg.warmup_ratio)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = (step - warm) / max(1, total - warm)
            if cfg.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0 if cfg.schedule == "constant" else max(0.0, 1 - progress)

        return factor

    def _loss(self, teacher: Any, student: Any, inputs: dict[str, Any], labels: Any) -> Any:
        import torch
        import torch.nn.functional as F

        cfg: DistillConfig = self.config
        hidden = cfg.hidden_weight > 0
        extra = {"output_hidden_states": True} if hidden else {}
        s_raw = call_module(student, {**inputs, **extra}) if hidden else call_module(student, inputs)
        s_name, s_out = main_output(s_raw)
        loss = torch.zeros((), device=s_out.device)
        use_teacher = cfg.alpha > 0 or hidden
        if use_teacher:
            with torch.no_grad():
                t_raw = call_module(teacher, {**inputs, **extra}) if hidden else call_module(teacher, inputs)
            _, t_out = main_output(t_raw)
        is_logits = s_name == "logits" or (s_out.dim() == 2 and labels is not None)
        if cfg.alpha > 0 and is_logits and s_out.dim() == 3 and cfg.output_loss in ("auto", "kl"):
            # a language model: next-token KL at every real (unpadded) position, averaged over positions
            t = cfg.temperature
            real = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones(
                s_out.shape[:2], dtype=torch.bool, device=s_out.device)
            log_q = F.log_softmax(s_out.float()[real] / t, -1)
            log_p = F.log_softmax(t_out.float()[real] / t, -1)
            kd = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t
            loss = loss + cfg.alpha * kd
        elif cfg.alpha > 0:
            kind = cfg.output_loss if cfg.output_loss != "auto" else ("kl" if is_logits else "cosine")
            mask = inputs.get("attention_mask")
            s_vec, t_vec = (s_out, t_out.float()) if is_logits else (pooled(s_out, mask), pooled(t_out, mask))
            if kind == "kl":
                t = cfg.temperature
                kd = F.kl_div(F.log_softmax(s_vec.float() / t, -1), F.softmax(t_vec / t, -1),
                              reduction="batchmean") * t * t
            elif kind == "mse":
                kd = F.mse_loss(s_vec.float(), t_vec)
            else:
                kd = (1 - F.cosine_similarity(s_vec.float(), t_vec, dim=-1)).mean()
            loss = loss + cfg.alpha * kd
        if labels is not None and is_logits and cfg.alpha < 1:
            loss = loss + (1 - cfg.alpha) * F.cross_entropy(s_out.float(), labels)
        elif is_logits and s_out.dim() == 3 and cfg.alpha < 1 and "input_ids" in inputs:
            # a language model's own labels are its next tokens (real positions only)
            target = inputs["input_ids"][:, 1:].masked_fill(~inputs["attention_mask"][:, 1:].bool(), -100) \
                if "attention_mask" in inputs else inputs["input_ids"][:, 1:]
            loss = loss + (1 - cfg.alpha) * F.cross_entropy(s_out[:, :-1].float().flatten(0, 1), target.flatten(),
                                                            ignore_index=-100)
        elif cfg.alpha == 0:
            raise PassError("alpha = 0 trains on labels only, but the data has no labels or the model no logits")
        if hidden:
            s_h, t_h = s_raw.hidden_states, t_raw.hidden_states
            picks = [round(i * (len(t_h) - 1) / max(1, len(s_h) - 1)) for i in range(len(s_h))]
            pairs = [(s, t_h[j]) for s, j in zip(s_h, picks, strict=True) if s.shape == t_h[j].shape]
            if pairs:
                loss = loss + cfg.hidden_weight * sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / len(pairs)
        return loss

    @staticmethod
    def _selection_split(ctx: PassContext) -> str:
        """Epochs are compared on the validation split; without one, on eval (which also reports the
        final accuracy, so the choice is then mildly optimistic), and on train as a last resort."""
        return next(s for s in ("validation", "eval", "train") if s == "train" or ctx.inputs.has_split(s))

    def _train_batches(self, ctx: PassContext, causal: bool) -> list[Any]:
        """The train split in batches; for a causal LM, unpadded token blocks of it (seeded), the way it is
        evaluated, `batch_size` blocks a batch."""
        cfg: DistillConfig = self.config
        if not causal:
            return list(ctx.batches("train", cfg.batch_size))
        import torch

        rows = [b.inputs["input_ids"] for b in token_blocks(ctx.inputs, "train", ctx.inputs.max_length,
                                                            seed=ctx.seed)]
        ids = torch.cat(rows)
        ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(ctx.seed))]
        chunks = [ids[i:i + cfg.batch_size] for i in range(0, len(ids), cfg.batch_size)]
        return [Batch({"input_ids": c, "attention_mask": torch.ones_like(c)}) for c in chunks]

    def _evaluate(self, teacher: Any, student: Any, ctx: PassContext) -> tuple[float, str, float]:
        """(score, metric, value shown): a causal LM's perplexity on token blocks of the selection split (lower
        is better: the score is its negative), else accuracy with labels and logits, else cosine to the teacher."""
        if is_causal_lm(TorchModel(student)):
            return self._perplexity(student, ctx)
        score, metric = self._accuracy_or_fidelity(teacher, student, ctx)
        return score, metric, score

    def _perplexity(self, student: Any, ctx: PassContext) -> tuple[float, str, float]:
        import torch
        import torch.nn.functional as F

        split = self._selection_split(ctx)
        nll, count = 0.0, 0
        student.eval()
        with torch.inference_mode():
            for batch in token_blocks(ctx.inputs, split, ctx.inputs.max_length, seed=ctx.seed)[:16]:
                ids = batch.inputs["input_ids"].to(ctx.device)
                logits = call_module(student, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
                nll += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                                             reduction="sum"))
                count += ids[:, 1:].numel()
        student.train()
        perplexity = math.exp(nll / max(count, 1))
        return -perplexity, f"{split}_perplexity", perplexity

    def _accuracy_or_fidelity(self, teacher: Any, student: Any, ctx: PassContext) -> tuple[float, str]:
        """Accuracy on the selection split when there are labels and logits, else cosine to the teacher."""
        import torch

        split = self._selection_split(ctx)
        student.eval()
        correct = total = 0
        cosines = []
        with torch.inference_mode():
            for batch in ctx.batches(split, 32, limit=256):
                inputs = inputs_for(student, batch.inputs, ctx.device)
                name, out = main_output(call_module(student, inputs))
                if batch.labels is not None and name == "logits":
                    correct += int((out.argmax(-1).cpu() == batch.labels).sum())
                    total += len(batch.labels)
                else:
                    _, t_out = main_output(call_module(teacher, inputs))
                    mask = inputs.get("attention_mask")
                    cosines.append(torch.nn.functional.cosine_similarity(
                        pooled(out, mask), pooled(t_out, mask), dim=-1).mean().item())
        student.train()
        if total:
            return correct / total, "accuracy"
        return sum(cosines) / max(1, len(cosines)), "fidelity_to_teacher"

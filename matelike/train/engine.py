"""The one training loop that pretraining, SFT and DPO share.

A stage differs from another only in the batches it reads and the loss it computes; it hands the engine a
*Task* and the engine owns everything else: device and torchrun setup, DDP/FSDP2, precision (autocast and the
fp16 scaler), gradient accumulation, clipping, the LR schedule, the optimizer, checkpoints with exact resume,
SIGINT/SIGTERM, the NaN/inf guard, metrics.jsonl, the progress bar and the final model directory.

The Task protocol
-----------------
A Task is any object with these members (see `Task` below for the typing):

``batches(rank, world_size, cursor) -> Iterator[tuple[batch, next_cursor]]``
    Yields this rank's micro-batches, each with the cursor to pass back in order to continue right *after* it.
    ``cursor`` is None for a fresh run, else a value this iterator yielded before (restored from a
    checkpoint). Cursors must be plain values: ints, floats, str, bool, None and tuples/lists/dicts of them,
    which is all a checkpoint loads back (it never unpickles anything else; a cursor holding, say, a numpy
    integer fails loudly at the first save). Every rank gets the same cursor, so a cursor should describe the
    *global* position (for example "micro-batches consumed"), and each rank takes its own share of each global
    batch: a run on N processes with batch B then sees the same data as one process with batch N*B. Iterate
    forever (over epochs) or stop: a finished iterator ends the run.
    ``batch`` is a tensor or a dict/list/tuple of CPU tensors; the engine moves tensors to the device.

``loss(model, batch) -> tuple[loss, metrics, n_tokens]`` or ``tuple[loss, metrics, n_tokens, weight]``
    Called under autocast in train mode. ``model`` is the wrapped module (DDP / FSDP2 / compiled): call it,
    do not reach for attributes on it (keep what you need, like a frozen reference model, on the Task).
    ``loss`` is a scalar tensor, the *mean* over the micro-batch; ``metrics`` maps names to floats (or 0-d
    tensors) averaged the same way as the loss and logged with it (e.g. ``{"aux_loss": ...}``);
    ``n_tokens`` is the number of tokens the loss covers (targets that are not ignored). ``weight`` (optional):
    what the micro-batch's mean runs over when that is not what ``weight_by_tokens`` says (SFT's per-sample
    mean: its number of samples); micro-batches and ranks then combine weighted by it.

``weight_by_tokens: bool`` (optional, default True)
    True: micro-batches and ranks are combined weighted by ``n_tokens``, so accumulation and data parallelism
    give exactly the token-mean loss of one large batch (right for cross-entropy). False: each micro-batch
    weighs the same (right for a loss that is a mean over examples, like DPO's mean over pairs).

``epoch_size(world_size) -> int`` (optional)
    Micro-batches per rank in one pass over the data; needed only when the run length comes from --epochs.

``evaluate(model, rank, world_size) -> dict[str, float]`` (optional)
    Called on *every* rank at the same time, under ``torch.no_grad()``, autocast and ``model.eval()``, every
    --eval-every steps and at the end. A task may split the work over ranks and combine it with
    ``matelike.train.distributed.sum_over_ranks``; the values must be the global ones. Rank 0 logs them (as
    ``val_loss``, ``val_bpb`` ... ) on the metrics line of that step.

Minimal example::

    class Copy:
        def batches(self, rank, world_size, cursor):
            i = cursor or 0
            while True:
                x = data[i * world_size + rank]; i += 1
                yield x, i
        def loss(self, model, batch):
            out = model(batch[:, :-1], batch[:, 1:])
            return out.loss, {}, batch[:, 1:].numel()

    result = Trainer(config, model, tokenizer, Copy()).fit()

Run length: --max-steps wins, else --max-tokens / (batch * seq_len * grad_accum * world size), else --epochs
(default 1) x ``epoch_size``. Step t (1-based) uses the schedule's lr at t: warmup from 0, cosine to min_lr.

What the engine writes under --out
----------------------------------
- the model directory itself (``export(model, out)``, by default ``matelike.model.io.save_model``), at every
  checkpoint and at the end; rank 0 only (under FSDP the full weights are gathered first);
- ``checkpoints/step-N/`` (see matelike.train.checkpoint): model, optimizer, scheduler, scaler, step, tokens,
  the Task's cursor and every rank's RNG states; written atomically, hashed, the last --keep kept. --resume
  takes the newest intact one (damaged ones are reported and skipped) and continues bitwise-identically in
  fp32 on CPU in one process (same thread count); elsewhere within float reduction-order noise;
- ``metrics.jsonl``: one line per --log-every steps, per eval and per skipped step, with step, tokens, loss,
  lr, tokens_per_s, grad_norm, mfu (when the progress bar measured the peak), the Task's metrics, and on
  eval lines the keys ``evaluate`` returned. On resume, lines past the checkpoint are dropped first;
- with --report-to tensorboard, the same numbers as TensorBoard scalars in ``tensorboard/``.

Signals: SIGINT/SIGTERM finish the current step, save a checkpoint and return a FitResult whose exit_code is
128+signal; a second Ctrl-C stops at once. A non-finite loss or gradient skips the update (logged with
``"skipped": true``); --max-bad-steps in a row (5) raise TrainingDiverged without saving over good checkpoints.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from matelike.train import checkpoint as ckpt
from matelike.train import distributed as D
from matelike.train.config import TrainConfig
from matelike.train.flops import measure_matmul_peak, train_flops_per_token
from matelike.train.metrics import MetricsLog, Progress
from matelike.train.optim import build_optimizer
from matelike.train.precision import Precision
from matelike.train.schedule import WarmupCosine


@runtime_checkable
class Task(Protocol):
    """What a training stage gives the engine (see the module docstring for the full contract)."""

    def batches(self, rank: int, world_size: int, cursor: Any) -> Iterator[tuple[Any, Any]]: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any], int]: ...


class TrainingDiverged(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class FitResult:
    step: int
    total_steps: int
    tokens: int
    stopped_by: str | None  # "SIGINT"/"SIGTERM" when a signal ended the run early, else None
    last_metrics: dict[str, Any]

    @property
    def exit_code(self) -> int:
        """0 when the run finished; 128+signal when a signal stopped it (after saving a checkpoint)."""
        if self.stopped_by is None:
            return 0
        return 128 + int(getattr(signal, self.stopped_by))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. Call it before building the model so every rank builds the same one."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def default_export(tokenizer: Any) -> Callable[[nn.Module, Path], None]:
    """Write the HF model directory with matelike.model.io.save_model."""

    def export(model: nn.Module, out: Path) -> None:
        from matelike.model.io import save_model

        save_model(model, tokenizer, out)

    return export


class Trainer:
    """Runs a Task to completion (or to a signal) with everything in the module docstring.

    `export(model, out_dir)` writes the model directory at --out at every save and at the end; it defaults to
    `matelike.model.io.save_model(model, tokenizer, out_dir)`. Pass `export=None` with `tokenizer=None` only in
    tests of the engine itself.
    """

    def __init__(self, config: TrainConfig, model: nn.Module, tokenizer: Any, task: Task,
                 export: Callable[[nn.Module, Path], None] | None | str = "default") -> None:
        self.config = config
        self.task = task
        self.tokenizer = tokenizer
        self.export = default_export(tokenizer) if export == "default" else export
        self.info = D.setup(config.device)
        self.raw = model.to(self.info.device)
        self._model_cls = type(model)  # fully_shard swaps the class; exports rebuild the plain one
        self.precision = Precision.create(config.dtype, self.info.device)
        self.model = self._wrap(self.raw)
        self.optimizer = build_optimizer(self.raw, config)
        self._stop: str | None = None

    # ----------------------------------------------------------------- setup
    def _wrap(self, raw: nn.Module) -> nn.Module:
        cfg, info = self.config, self.info
        if cfg.fsdp:
            half = None if self.precision.name == "fp32" else self.precision.torch_dtype
            model = D.wrap(raw, info, fsdp=True, param_dtype=half)  # shards `raw` in place
            return torch.compile(model) if cfg.compile else model
        model = torch.compile(raw) if cfg.compile else raw
        return D.wrap(model, info, fsdp=False)

    def total_steps(self) -> int:
        cfg, world = self.config, self.info.world_size
        if cfg.max_steps:
            return cfg.max_steps
        if cfg.max_tokens:
            return max(1, math.ceil(cfg.max_tokens / (cfg.batch_size * cfg.seq_len * cfg.grad_accum * world)))
        size_fn = getattr(self.task, "epoch_size", None)
        if size_fn is None:
            raise ValueError("this stage cannot count its epochs: set --max-steps or --max-tokens")
        micro = size_fn(world)
        return max(1, math.ceil((cfg.epochs or 1.0) * micro / cfg.grad_accum))

    def _signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self._stop = name

    # ----------------------------------------------------------------- state
    def _state(self, step: int, tokens: int, cursor: Any, total: int) -> dict[str, Any] | None:
        """Rank 0's full training state (collective under FSDP: every rank must call it)."""
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(self.raw, options=opts)
            optim_sd = get_optimizer_state_dict(self.raw, self.optimizer, options=opts)
        else:
            model_sd, optim_sd = self.raw.state_dict(), self.optimizer.state_dict()
        if not self.info.is_main:
            return None
        return {
            "model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "step": step, "tokens": tokens, "cursor": cursor, "total_steps": total,
            "fsdp": self.config.fsdp, "world_size": self.info.world_size, "precision": self.precision.name,
            "config": self.config.to_dict(),
        }

    def _restore(self, path: Path) -> tuple[int, int, Any]:
        state, rng = ckpt.load(path, self.info)
        if bool(state.get("fsdp")) != self.config.fsdp:
            raise RuntimeError(f"{path} was saved {'with' if state.get('fsdp') else 'without'} --fsdp; "
                               f"resume it the same way")
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.raw, state["model"], options=opts)
            set_optimizer_state_dict(self.raw, self.optimizer, state["optimizer"], options=opts)
        else:
            self.raw.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        if rng is not None:
            ckpt.set_rng_state(rng)
        else:  # saved by fewer processes: this rank keeps the RNG seeded at startup
            print(f"matelike: {path} has no RNG state for rank {self.info.rank}; keeping its seeded RNG",
                  file=sys.stderr)
        return int(state["step"]), int(state["tokens"]), state["cursor"]

    def _export_model(self) -> nn.Module | None:
        """A plain (unsharded) module for the model directory, on rank 0; collective under FSDP."""
        if not self.config.fsdp:
            return self.raw if self.info.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        with torch.device("meta"):
            plain = self._model_cls(self.raw.config)  # type: ignore[call-arg]
        plain.load_state_dict(sd, assign=True)
        if hasattr(plain, "reset_rope"):  # non-persistent buffers stay on meta after a state-dict load
            plain.reset_rope()
        return plain

    def save(self, step: int, tokens: int, cursor: Any, total: int) -> None:
        t0 = time.perf_counter()
        state = self._state(step, tokens, cursor, total)
        ckpt.save(self.config.out / "checkpoints", step, state, self.info, self.config.keep)
        if self.export is not None:
            plain = self._export_model()
            if plain is not None:
                self.export(plain, self.config.out)
        D.barrier(self.info)
        self._log_text(f"saved checkpoint step-{step} in {time.perf_counter() - t0:.1f}s")

    def _log_text(self, text: str) -> None:
        if self.info.is_main:
            self.progress.write(f"matelike: {text}")

    # ----------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float]:
        fn = getattr(self.task, "evaluate", None)
        if fn is None:
            return {}
        self.model.eval()
        try:
            with torch.no_grad(), self.precision.autocast():
                out = fn(self.model, self.info.rank, self.info.world_size)
        finally:
            self.model.train()
        return {k: float(v) for k, v in out.items()}

    # ----------------------------------------------------------------- train
    def _sync_context(self, last: bool) -> Any:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        import contextlib

        if self.config.fsdp:
            self.raw.set_requires_gradient_sync(last)  # type: ignore[operator]  # raw is the FSDPModule
            return contextlib.nullcontext()
        if self.info.enabled and not last:
            return self.model.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def _train_step(self, micro: list[Any]) -> tuple[float, float, int, dict[str, float], bool]:
        """Forward/backward over the micro-batches, then one update. Returns
        (loss, grad_norm, global tokens, metrics, stop requested on any rank)."""
        cfg, prec = self.config, self.precision
        by_tokens = getattr(self.task, "weight_by_tokens", True)
        # Micro-batch losses are scaled by n/ref before backward and the gradient by world*ref/N_global after,
        # so the update is the token-weighted mean over every micro-batch on every rank whatever the sizes.
        ref = float(cfg.batch_size * cfg.seq_len) if by_tokens else 1.0
        dev = self.info.device
        # Sums stay on the device until one transfer per step: no host sync per micro-batch.
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        metric_sums: dict[str, torch.Tensor] = {}
        weight_sum, n_sum = 0.0, 0
        for i, batch in enumerate(micro):
            batch = to_device(batch, dev)
            with self._sync_context(i == len(micro) - 1):
                with prec.autocast():
                    loss, metrics, n_tokens, *weight = self.task.loss(self.model, batch)
                w = float(weight[0]) if weight else float(n_tokens) if by_tokens else 1.0
                scaled = loss.float() * (w / ref)
                if prec.scaler is not None:
                    scaled = prec.scaler.scale(scaled)
                scaled.backward()
            loss_sum += loss.detach().double() * w
            weight_sum += w
            n_sum += int(n_tokens)
            for k, v in metrics.items():
                v = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float64)
                metric_sums[k] = metric_sums.get(k, 0.0) + v.to(dev) * w
        keys = sorted(metric_sums)
        stats = torch.stack([loss_sum, *(metric_sums[k] for k in keys)])
        host = torch.tensor([weight_sum, float(n_sum), float(self._stop is not None)], dtype=torch.float64)
        packed = torch.cat([host.to(dev), stats])
        if self.info.enabled:
            packed = D.all_reduce_tensor(packed)
        values = packed.tolist()
        weight_g, n_g, stop_g, loss_g = values[:4]
        loss_mean = loss_g / max(weight_g, 1e-12)
        metrics_mean = {k: v / max(weight_g, 1e-12) for k, v in zip(keys, values[4:])}

        if prec.scaler is not None:
            prec.scaler.unscale_(self.optimizer)
        factor = self.info.world_size * ref / max(weight_g, 1e-12)
        if factor != 1.0:
            for p in self.raw.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)
        max_norm = cfg.clip if cfg.clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        grad_norm = float(norm)
        finite = math.isfinite(loss_mean) and (math.isfinite(grad_norm) or prec.scaler is not None)
        if prec.scaler is not None:
            if finite:
                prec.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
            prec.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if not finite:
            loss_mean = float("nan") if not math.isfinite(loss_mean) else loss_mean
        return loss_mean, grad_norm, int(n_g), {**metrics_mean, "_finite": float(finite)}, stop_g > 0

    def fit(self) -> FitResult:
        cfg, info = self.config, self.info
        total = self.total_steps()
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, total // 50)
        self.scheduler = WarmupCosine(self.optimizer, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=warmup,
                                      total_steps=total)
        step, tokens, cursor = 0, 0, None
        resume_from = ckpt.find_latest(cfg.out / "checkpoints", info) if cfg.resume else None
        if resume_from is not None:
            step, tokens, cursor = self._restore(resume_from)
        show_bar = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        self.progress = Progress(total, step, enabled=bool(show_bar and info.is_main))
        if cfg.resume:
            self._log_text(f"resuming from {resume_from} (step {step})" if resume_from
                           else "no checkpoint to resume from; starting fresh")
        log = (MetricsLog(cfg.out, resume_step=step if resume_from else None, report_to=cfg.report_to)
               if info.is_main else None)
        flops_per_token = train_flops_per_token(self.raw, cfg.seq_len)
        peak = None
        if show_bar and info.is_main:  # MFU needs the machine's peak; measuring takes a moment
            peak = measure_matmul_peak(self.precision.torch_dtype, info.device, size=1024, seconds=0.3)

        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, self._signal)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        self.model.train()
        data = iter(self.task.batches(info.rank, info.world_size, cursor))
        last: dict[str, Any] = {}
        bad_in_a_row, saved_step = 0, step if resume_from else -1
        has_eval = getattr(self.task, "evaluate", None) is not None
        stopped_by: str | None = None
        window_t, window_tokens = time.perf_counter(), 0
        try:
            while step < total:
                micro = []
                for _ in range(cfg.grad_accum):
                    try:
                        batch, next_cursor = next(data)
                    except StopIteration:
                        break
                    micro.append(batch)
                    cursor = next_cursor
                if len(micro) < cfg.grad_accum:
                    self._log_text(f"data ran out at step {step}; ending the run there")
                    break
                loss, grad_norm, n_tokens, metrics, stop = self._train_step(micro)
                finite = bool(metrics.pop("_finite"))
                step += 1
                tokens += n_tokens
                window_tokens += n_tokens
                bad_in_a_row = 0 if finite else bad_in_a_row + 1
                if not finite:
                    self._log_text(f"step {step}: non-finite loss/gradient (loss={loss}, grad_norm={grad_norm}); "
                                   f"update skipped ({bad_in_a_row} in a row)")
                    if bad_in_a_row >= cfg.max_bad_steps:
                        raise TrainingDiverged(
                            f"{bad_in_a_row} consecutive steps had a non-finite loss or gradient (last at step "
                            f"{step}); stopping. The last good checkpoint is intact in {cfg.out / 'checkpoints'}: "
                            f"lower --lr, check the data, or use --dtype fp32/bf16 and --resume")
                do_eval = has_eval and ((cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == total)
                do_log = step % cfg.log_every == 0 or step == total or not finite or do_eval or stop
                tps = window_tokens / max(time.perf_counter() - window_t, 1e-9)
                mfu = tps * flops_per_token / (peak * info.world_size) if peak else None
                if info.is_main:
                    self.progress.update(1, loss if finite else float("nan"), tps, mfu)
                if do_log:
                    last = {"step": step, "tokens": tokens, "loss": loss, "lr": self._lr_used(step),
                            "tokens_per_s": round(tps, 2), "grad_norm": grad_norm, "dtype": self.precision.name,
                            **metrics}
                    if mfu is not None:
                        last["mfu"] = float(f"{mfu:.3g}")  # significant figures: a toy model's MFU is tiny
                    if not finite:
                        last["skipped"] = True
                    if do_eval:
                        last.update(self.evaluate())
                    if log is not None:
                        log.write(last)
                    window_t, window_tokens = time.perf_counter(), 0
                if stop:
                    stopped_by = self._stop or "SIGTERM"
                    break
                if step % cfg.save_every == 0 and step < total:
                    self.save(step, tokens, cursor, total)
                    saved_step = step
                    window_t = time.perf_counter()
            # The end, a signal or the data running out: save, so the final steps are never lost.
            if step > 0 and saved_step != step:
                self.save(step, tokens, cursor, total)
            if stopped_by:
                self._log_text(f"stopped by {stopped_by} at step {step}/{total}; checkpoint saved, "
                               f"continue with --resume")
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self.progress.close()
            if log is not None:
                log.close()
        return FitResult(step=step, total_steps=total, tokens=tokens, stopped_by=stopped_by, last_metrics=last)

    def _lr_used(self, step: int) -> float:
        """The (peak-group) learning rate update number `step` used."""
        return self.scheduler.lr * self.scheduler.factor(step)

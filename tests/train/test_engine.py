"""The training engine in one process, with the toy Task (matelike.train.toy): fast unit-level checks."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from toy import ToyConfig, ToyModel, ToyTask, export_toy

from matelike.train import TrainConfig, Trainer, TrainingDiverged, add_engine_args, seed_everything
from matelike.train import checkpoint as ckpt
from matelike.train.metrics import REQUIRED_KEYS
from matelike.train.optim import Muon, build_optimizer, newton_schulz
from matelike.train.precision import Precision
from matelike.train.schedule import WarmupCosine, lr_at


def make(out: Path, **kw) -> tuple[TrainConfig, ToyModel, ToyTask]:
    task_kw = {k: kw.pop(k) for k in ("nan_steps", "ignore_tail", "row_mean") if k in kw}
    defaults = dict(out=out, max_steps=6, batch_size=4, seq_len=8, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                    dtype="fp32", log_every=1, save_every=100, progress=False)
    config = TrainConfig(**{**defaults, **kw})
    seed_everything(config.seed)
    model = ToyModel(ToyConfig())
    task = ToyTask(batch_size=config.batch_size, seq_len=config.seq_len, vocab_size=32, seed=config.seed, **task_kw)
    return config, model, task


def fit(out: Path, **kw):
    config, model, task = make(out, **kw)
    trainer = Trainer(config, model, None, task, export=export_toy)
    return trainer, trainer.fit(), model


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ schedule
def test_schedule_warmup_from_zero_then_cosine_to_min() -> None:
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine: (lr + min) / 2
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)  # past the end it stays at min_lr
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(0, lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=10) == 1.0


def test_scheduler_drives_each_group_from_its_peak_and_resumes() -> None:
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p1], "peak_lr": 1.0}, {"params": [p2], "peak_lr": 0.1}], lr=1.0)
    sched = WarmupCosine(opt, lr=1.0, min_lr=0.0, warmup_steps=4, total_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)  # the first update uses lr_at(1)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.025)
    for _ in range(3):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    other = WarmupCosine(opt, lr=1.0, min_lr=0.0, warmup_steps=4, total_steps=10)
    other.load_state_dict(sched.state_dict())
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1)


def test_run_uses_warmup_and_ends_at_min_lr(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=5, warmup_steps=2)
    lrs = [m["lr"] for m in read_metrics(tmp_path)]
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)


# ------------------------------------------------------------------ config and flags
def test_engine_args_take_stage_defaults_and_build_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser, lr=1e-4, min_lr=1e-5)
    args = parser.parse_args(["--out", str(tmp_path), "--batch-size", "3", "--optimizer", "muon", "--dtype", "fp32"])
    config = TrainConfig.from_args(args)
    assert (config.lr, config.min_lr, config.batch_size, config.optimizer) == (1e-4, 1e-5, 3, "muon")
    assert config.out == tmp_path
    with pytest.raises(TypeError, match="unknown engine defaults"):
        add_engine_args(argparse.ArgumentParser(), learning_rate=1.0)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(min_lr=1.0, lr=0.1), dict(dtype="fp8"),
                                 dict(optimizer="sgd"), dict(max_steps=0), dict(epochs=-1.0),
                                 dict(optimizer="muon", fsdp=True)])
def test_config_rejects_bad_values(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(out=tmp_path, **bad)


def test_run_length_from_tokens_and_epochs(tmp_path: Path) -> None:
    config, model, task = make(tmp_path, max_steps=None, max_tokens=1000, batch_size=4, seq_len=8, grad_accum=2)
    assert Trainer(config, model, None, task, export=None).total_steps() == math.ceil(1000 / 64)
    config, model, task = make(tmp_path, max_steps=None, epochs=2.0, grad_accum=2)
    assert Trainer(config, model, None, task, export=None).total_steps() == 2 * task.epoch_batches // 2


# ------------------------------------------------------------------ precision
def test_fp32_precision_has_no_scaler_and_no_autocast() -> None:
    cpu = torch.device("cpu")
    precision = Precision.create("fp32", cpu)
    assert precision.scaler is None and precision.torch_dtype == torch.float32


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    _, result, model = fit(tmp_path, dtype="bf16", max_steps=4)
    assert result.step == 4 and all(torch.isfinite(p).all() for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


# ------------------------------------------------------------------ accumulation and clipping
@pytest.mark.parametrize("ignore_tail", [False, True])
def test_grad_accumulation_equals_large_batch(tmp_path: Path, ignore_tail: bool) -> None:
    _, r1, big = fit(tmp_path / "big", batch_size=8, grad_accum=1, max_steps=3, ignore_tail=ignore_tail)
    _, r2, acc = fit(tmp_path / "acc", batch_size=2, grad_accum=4, max_steps=3, ignore_tail=ignore_tail)
    for a, b in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    la = [m["loss"] for m in read_metrics(tmp_path / "big")]
    lb = [m["loss"] for m in read_metrics(tmp_path / "acc")]
    assert la == pytest.approx(lb, rel=1e-5)
    assert r1.tokens == r2.tokens


def test_a_loss_weight_from_the_task_combines_micro_batches_by_it(tmp_path: Path) -> None:
    # A mean over rows returned with its row count: accumulation over micro-batches of rows of different
    # lengths gives the large batch's mean over rows, not the token-weighted mix of the micro-batch means.
    _, r1, big = fit(tmp_path / "big", batch_size=8, grad_accum=1, max_steps=3, ignore_tail=True, row_mean=True)
    _, r2, acc = fit(tmp_path / "acc", batch_size=2, grad_accum=4, max_steps=3, ignore_tail=True, row_mean=True)
    for a, b in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    la = [m["loss"] for m in read_metrics(tmp_path / "big")]
    assert la == pytest.approx([m["loss"] for m in read_metrics(tmp_path / "acc")], rel=1e-5)
    assert r1.tokens == r2.tokens  # still the tokens the loss covered
    # ... and a different update from the token mean's on the same rows.
    _, _, by_tokens = fit(tmp_path / "tok", batch_size=8, grad_accum=1, max_steps=3, ignore_tail=True)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(big.parameters(), by_tokens.parameters()))


def test_clipping_bounds_the_gradient_the_optimizer_sees(tmp_path: Path) -> None:
    config, model, task = make(tmp_path, clip=0.05, max_steps=3)
    trainer = Trainer(config, model, None, task, export=None)
    seen = []
    step = trainer.optimizer.step

    def spy(*a, **k):
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
        return step(*a, **k)

    trainer.optimizer.step = spy  # type: ignore[method-assign]
    trainer.fit()
    logged = [m["grad_norm"] for m in read_metrics(tmp_path)]
    assert len(seen) == 3 and all(n <= 0.05 + 1e-5 for n in seen)
    assert all(g > 0.05 for g in logged)  # the logged norm is the one before clipping


# ------------------------------------------------------------------ NaN guard
def test_nan_step_is_skipped_and_logged(tmp_path: Path) -> None:
    config, model, task = make(tmp_path, max_steps=5, nan_steps=[2])
    trainer = Trainer(config, model, None, task, export=None)
    snapshots = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (snapshots.append(1), step(*a, **k))  # type: ignore[method-assign]
    result = trainer.fit()
    lines = read_metrics(tmp_path)
    assert result.step == 5 and len(snapshots) == 4  # micro-batch index 2 is step 3: no update there
    assert lines[2]["skipped"] is True and lines[2]["loss"] is None
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_nan_stops_with_clear_error_and_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match="consecutive steps had a non-finite"):
        fit(tmp_path, max_steps=20, save_every=2, nan_steps=range(3, 20), max_bad_steps=3)
    root = tmp_path / "checkpoints"
    steps = ckpt.list_steps(root)
    assert steps and max(steps) <= 6
    assert ckpt.verify(ckpt.step_dir(root, max(steps))) is None
    state = torch.load(ckpt.step_dir(root, max(steps)) / "state.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# ------------------------------------------------------------------ checkpoints
def test_checkpoints_keep_last_k_and_resume_continues(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=6, save_every=2, keep=2)
    root = tmp_path / "checkpoints"
    assert ckpt.list_steps(root) == [4, 6]
    assert (tmp_path / "toy_model.pt").is_file()
    _, result, _ = fit(tmp_path, max_steps=8, save_every=2, keep=2, resume=True)
    assert result.step == 8 and ckpt.list_steps(root) == [6, 8]
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 9))


def test_resume_in_process_matches_uninterrupted_run(tmp_path: Path) -> None:
    fit(tmp_path / "ref", max_steps=8)
    fit(tmp_path / "cut", max_steps=8, save_every=3)
    # Drop the last checkpoints, as if the run had died right after step 3.
    for s in (6, 8):
        import shutil

        shutil.rmtree(tmp_path / "cut" / "checkpoints" / f"step-{s}")
    fit(tmp_path / "cut", max_steps=8, save_every=3, resume=True)
    ref = [m["loss"] for m in read_metrics(tmp_path / "ref")]
    cut = [m["loss"] for m in read_metrics(tmp_path / "cut")]
    assert ref == cut


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest", "delete"])
def test_corrupted_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, capsys, damage: str) -> None:
    fit(tmp_path, max_steps=6, save_every=3, keep=0)
    newest = tmp_path / "checkpoints" / "step-6"
    state = newest / "state.pt"
    if damage == "flip":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif damage == "truncate":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        state.unlink()
    capsys.readouterr()
    _, result, _ = fit(tmp_path, max_steps=6, save_every=3, keep=0, resume=True)
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is corrupted or incomplete" in err
    assert "resuming from" in err and "step-3" in err
    assert result.step == 6
    assert ckpt.verify(newest) is None  # rewritten by the resumed run


def test_resume_without_checkpoints_starts_fresh(tmp_path: Path, capsys) -> None:
    _, result, _ = fit(tmp_path, max_steps=2, resume=True)
    assert result.step == 2 and "starting fresh" in capsys.readouterr().err


def test_leftover_tmp_dir_is_ignored_and_cleaned(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=3, save_every=3)
    junk = tmp_path / "checkpoints" / "step-9.tmp"
    junk.mkdir()
    (junk / "state.pt").write_bytes(b"half")
    _, result, _ = fit(tmp_path, max_steps=5, save_every=3, resume=True)
    assert result.step == 5 and not junk.exists()


# ------------------------------------------------------------------ metrics
def test_metrics_jsonl_schema(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=6, log_every=2, eval_every=3)
    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines] == [2, 3, 4, 6]
    for m in lines:
        for key in REQUIRED_KEYS:
            assert isinstance(m[key], (int, float)) and not isinstance(m[key], bool), (key, m)
        assert isinstance(m["step"], int) and isinstance(m["tokens"], int)
        assert m["tokens"] == m["step"] * 4 * 8 and m["tokens_per_s"] > 0
    evals = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in evals] == [3, 6] and all(m["val_loss"] > 0 for m in evals)


# ------------------------------------------------------------------ optimizers
def test_newton_schulz_orthogonalises() -> None:
    g = torch.randn(16, 48, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(g, steps=10)
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.5 and s.max() < 1.3  # singular values pushed towards 1 (Muon's loose target)
    assert newton_schulz(g.T, steps=10).shape == (48, 16)


def test_muon_groups_and_training(tmp_path: Path) -> None:
    config, model, _ = make(tmp_path, optimizer="muon")
    opt = build_optimizer(model, config)
    assert isinstance(opt, Muon)
    muon_params = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    assert muon_params == {id(layer.weight) for layer in model.layers}  # embeddings, head, norm stay AdamW
    _, result, trained = fit(tmp_path, optimizer="muon", max_steps=10, muon_lr=0.02)
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert result.step == 10 and losses[-1] < losses[0]


def test_adamw_training_reduces_loss(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=30, lr=3e-2, min_lr=3e-3)
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_progress_bar_shows_loss_throughput_mfu(tmp_path: Path, capsys) -> None:
    fit(tmp_path, max_steps=3, progress=True)
    err = capsys.readouterr().err
    assert "loss=" in err and "tok/s=" in err and "mfu=" in err and "3/3" in err
    assert all(0 < m["mfu"] for m in read_metrics(tmp_path))


def test_gradient_scaler_path_matches_unscaled_training(tmp_path: Path) -> None:
    # fp16 needs a GPU; the scaler's bookkeeping (scale, unscale, skip, update, checkpoint) is the same on CPU.
    _, _, plain = fit(tmp_path / "plain", max_steps=4)
    config, model, task = make(tmp_path / "scaled", max_steps=4)
    trainer = Trainer(config, model, None, task, export=None)
    trainer.precision = Precision("fp32", torch.device("cpu"), torch.amp.GradScaler("cpu", init_scale=2.0**10))
    trainer.fit()
    for a, b in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    state = torch.load(tmp_path / "scaled" / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] == 2.0**10


def test_teardown_frees_unreachable_models_before_destroying_the_group(tmp_path: Path) -> None:
    """FSDP2 modules live in reference cycles that hold the process group; teardown must collect them while
    the group (and the interpreter) is whole, not leave them to the shutdown that aborts in gloo's threads."""
    import gc

    import torch.distributed as dist

    from matelike.train.distributed import teardown

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    group_alive_at_free: list[bool] = []

    class Cycle:
        def __init__(self) -> None:
            self.me = self
            self.group = dist.group.WORLD

        def __del__(self) -> None:
            group_alive_at_free.append(dist.is_initialized())

    gc.disable()  # only teardown's own collection may free the cycle
    try:
        Cycle()
        teardown()
    finally:
        gc.enable()
    assert group_alive_at_free == [True]
    assert not dist.is_initialized()


def test_cli_ends_the_process_group_after_the_command_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    import matelike.cli as cli
    import matelike.train.distributed as D

    calls: list[str] = []

    def handler(args: argparse.Namespace) -> int:
        calls.append("command")
        return 3

    monkeypatch.setattr(D, "teardown", lambda: calls.append("teardown"))
    parser = argparse.ArgumentParser()
    parser.set_defaults(handler=handler)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 3
    assert calls == ["command", "teardown"]

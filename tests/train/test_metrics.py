"""metrics.jsonl's TensorBoard copy (`--report-to tensorboard`): the toy Task in one process, and a real
`matelike pretrain` run read back by a real TensorBoard server."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from toy import ToyConfig, ToyModel, ToyTask, export_toy

from matelike.train import TrainConfig, Trainer, add_engine_args, seed_everything
from matelike.train.metrics import TENSORBOARD_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fit(out: Path, **kw) -> None:
    defaults = dict(out=out, max_steps=6, batch_size=4, seq_len=8, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                    dtype="fp32", log_every=1, save_every=100, progress=False, report_to="tensorboard")
    config = TrainConfig(**{**defaults, **kw})
    seed_everything(config.seed)
    task = ToyTask(batch_size=config.batch_size, seq_len=config.seq_len, vocab_size=32, seed=config.seed)
    Trainer(config, ToyModel(ToyConfig()), None, task, export=export_toy).fit()


def jsonl_curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard should hold it: (step, value as a 32-bit float) per numeric key."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                curves.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return curves


def event_curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of OUT/tensorboard read back with TensorBoard's own loader (orphaned steps purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_equal_metrics_jsonl(tmp_path: Path) -> None:
    fit(tmp_path, eval_every=3)
    expected = jsonl_curves(tmp_path)
    assert {"loss", "lr", "tokens", "tokens_per_s", "grad_norm", "val_loss"} <= set(expected)
    assert [s for s, _ in expected["val_loss"]] == [3, 6]
    assert event_curves(tmp_path) == expected
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1


def test_resume_and_fresh_runs_leave_one_curve_per_step(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=8, save_every=3)
    # As if the run had died right after step 3: steps 4-8 are logged but no checkpoint holds them.
    for s in (6, 8):
        shutil.rmtree(tmp_path / "checkpoints" / f"step-{s}")
    fit(tmp_path, max_steps=8, save_every=3, resume=True)
    curves = event_curves(tmp_path)
    assert [s for s, _ in curves["loss"]] == list(range(1, 9))
    assert curves == jsonl_curves(tmp_path)
    # A fresh run in the same folder replaces the earlier run's curves, as it rewrites metrics.jsonl.
    fit(tmp_path, max_steps=2)
    curves = event_curves(tmp_path)
    assert [s for s, _ in curves["loss"]] == [1, 2]
    assert curves == jsonl_curves(tmp_path)


def test_no_report_writes_no_events(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=2, report_to="none")
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / TENSORBOARD_DIR).exists()


def test_missing_tensorboard_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match=r"tensorboard package, which is not installed: pip install"):
        TrainConfig(out=tmp_path, report_to="tensorboard")
    parser = add_engine_args(argparse.ArgumentParser(prog="matelike pretrain"))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--out", str(tmp_path), "--report-to", "tensorboard"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --report-to: --report-to tensorboard needs the tensorboard package" in err
    assert "matelike[tensorboard]" in err
    assert parser.parse_args(["--out", str(tmp_path)]).report_to == "none"  # the default needs nothing


def test_unknown_destination_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="--report-to must be one of none, tensorboard, got 'wandb'"):
        TrainConfig(out=tmp_path, report_to="wandb")
    parser = add_engine_args(argparse.ArgumentParser(prog="matelike sft"))
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(tmp_path), "--report-to", "wandb"])
    assert "got 'wandb'" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_every_stage_takes_the_flag(stage: str, tmp_path: Path) -> None:
    from matelike.cli import build_parser

    required = {"pretrain": ["--preset", "tiny", "--data", "x.bin", "--tokenizer", "tok"],
                "sft": ["--init", "m", "--data", "x.jsonl"], "dpo": ["--init", "m", "--data", "x.jsonl"]}[stage]
    args = build_parser().parse_args([stage, *required, "--out", str(tmp_path), "--report-to", "tensorboard"])
    assert args.report_to == "tensorboard"
    args.seq_len = args.seq_len or 32  # each stage resolves it from the model before building the config
    assert TrainConfig.from_args(args).report_to == "tensorboard"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pretrain_curves_in_a_tensorboard_server(tmp_path: Path, tokenizer_dir: Path) -> None:
    """What a person watching the run sees: `tensorboard --logdir` (default loader) serves metrics.jsonl's
    numbers for a real `matelike pretrain --report-to tensorboard`."""
    from matelike.cli import main
    from matelike.data.pack import pack

    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(40):
            text = f"第{i}条：这家店的服务很好，菜的味道也不错，下次还会再来。"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    pack(tokenizer_dir, [corpus], tmp_path / "train.bin", val_out=tmp_path / "val.bin", val_fraction=0.2, seed=1,
         progress=False)
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--data", str(tmp_path / "train.bin"), "--val",
                 str(tmp_path / "val.bin"), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--seq-len", "32",
                 "--batch-size", "2", "--max-steps", "4", "--log-every", "1", "--eval-every", "2", "--dtype", "fp32",
                 "--eval-tokens", "128", "--no-progress", "--report-to", "tensorboard"]) == 0
    expected = jsonl_curves(out)
    assert {"loss", "lr", "tokens", "val_loss", "val_bpb"} <= set(expected)

    port = _free_port()
    log = tmp_path / "tensorboard.log"  # a file, not a pipe nobody reads while the server runs
    with open(log, "w", encoding="utf-8") as err:
        server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(out), "--host",
                                   "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                                  stdout=subprocess.DEVNULL, stderr=err)
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"
    try:
        deadline, tags = time.time() + 90, {}
        while not tags.get(TENSORBOARD_DIR) or set(tags[TENSORBOARD_DIR]) != set(expected):
            if server.poll() is not None or time.time() > deadline:
                raise AssertionError(f"TensorBoard served {tags}; its log: {log.read_text(encoding='utf-8')}")
            time.sleep(1)
            try:
                tags = httpx.get(f"{base}/tags", timeout=5).json()
            except httpx.HTTPError:
                pass
        for tag, points in expected.items():
            served = httpx.get(f"{base}/scalars", params={"run": TENSORBOARD_DIR, "tag": tag}, timeout=5).json()
            assert [(step, value) for _, step, value in served] == points, tag
    finally:
        server.terminate()
        server.wait(timeout=30)

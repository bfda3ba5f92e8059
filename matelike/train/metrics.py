"""metrics.jsonl (one JSON object per log or eval line), its TensorBoard copy and the progress bar. Rank 0 only.

metrics.jsonl is the record of a run. `--report-to tensorboard` also writes each line's numbers as TensorBoard
scalars under OUT/tensorboard/, to watch a long run live (`tensorboard --logdir OUT`); TensorBoard keeps them
as 32-bit floats, so the JSON values stay the exact ones.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORT_TO = ("none", "tensorboard")  # the HF Trainer's flag name and spelling
_EVENT_PREFIX = "events.out.tfevents."
# Every line carries these; eval lines add val_loss (and val_bpb where bytes per token are known).
REQUIRED_KEYS = ("step", "tokens", "loss", "lr", "tokens_per_s")


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; a skipped non-finite step is logged with null and a flag instead.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_report_to(value: str) -> str:
    """`value` if it is a known --report-to destination whose package is installed, else ValueError saying so."""
    if value not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {value!r}")
    if value == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--report-to tensorboard needs the tensorboard package, which is not installed: "
                         "pip install 'matelike[tensorboard]'")
    return value


class TensorBoardLog:
    """Writes metrics lines as TensorBoard scalars named as in metrics.jsonl, at x = the line's step.

    A fresh run removes the event files of an earlier run in the folder (as metrics.jsonl is rewritten); a
    resumed run purges what an earlier run wrote past the checkpoint's step, as metrics.jsonl drops those lines.
    """

    def __init__(self, out: Path, *, resume_step: int | None) -> None:
        check_report_to("tensorboard")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # installed but unusable (say, a protobuf it cannot load): name the cause
            raise ValueError(f"--report-to tensorboard: cannot load TensorBoard's writer: {e}") from e
        self.dir = out / TENSORBOARD_DIR
        if resume_step is None and self.dir.is_dir():
            for old in self.dir.glob(_EVENT_PREFIX + "*"):
                old.unlink()
        purge = resume_step + 1 if resume_step is not None else None
        self._writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            # Numbers only: the dtype name and the skipped flag are not curves, and a non-finite loss is
            # already marked in metrics.jsonl (null and "skipped").
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()  # watched live: every line reaches the file as metrics.jsonl's does

    def close(self) -> None:
        self._writer.close()


class MetricsLog:
    """Appends lines to OUT/metrics.jsonl; on resume first drops lines past the checkpoint's step.

    `report_to="tensorboard"` also writes every line as TensorBoard scalars (TensorBoardLog).
    """

    def __init__(self, out: Path, *, resume_step: int | None, report_to: str = "none") -> None:
        check_report_to(report_to)
        self.path = out / METRICS_FILE
        out.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:  # a line cut short by a kill: drop it
                    continue
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._f: TextIO = open(self.path, "a", encoding="utf-8")
        self._tensorboard = TensorBoardLog(out, resume_step=resume_step) if report_to == "tensorboard" else None

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}, ensure_ascii=False) + "\n")
        self._f.flush()
        if self._tensorboard is not None:
            self._tensorboard.write(record)

    def close(self) -> None:
        self._f.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class Progress:
    """tqdm bar over optimizer steps showing loss, tokens/s, MFU (when a peak is known); tqdm gives the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int, loss: float, tokens_per_s: float, mfu: float | None) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

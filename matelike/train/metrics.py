"""metrics.jsonl (one JSON object per log or eval line) and the progress bar. Rank 0 only."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
# Every line carries these; eval lines add val_loss (and val_bpb where bytes per token are known).
REQUIRED_KEYS = ("step", "tokens", "loss", "lr", "tokens_per_s")


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; a skipped non-finite step is logged with null and a flag instead.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends lines to OUT/metrics.jsonl; on resume first drops lines past the checkpoint's step."""

    def __init__(self, out: Path, *, resume_step: int | None) -> None:
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

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


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

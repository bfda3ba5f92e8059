"""`matelike run`: the whole pipeline on the embedded demo data, one stage after another.

Every stage runs as its own `python -m matelike ...` process, exactly the command a user would type, so the
report can print the commands that reproduce the run and a crash in one stage cannot corrupt another's state.
Each stage writes into its own folder under OUT and, once it has finished, a marker `OUT/.stages/NAME.json`
(command, wall time). Re-running skips stages with a marker; an interrupted training stage resumes from its
newest checkpoint (`--resume`), make-pairs continues its file, and the quick stages start over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from matelike.cli import CommandTable

STAGES: tuple[str, ...] = ("data", "tokenizer", "pack", "pretrain", "sft", "pairs", "dpo", "rl", "eval", "report")
TRAINED: tuple[str, ...] = ("pretrain", "sft", "dpo", "rl")  # the stages that save a model, in pipeline order
MARKERS = ".stages"
TIME_PLAN = "time_budget.json"  # in the run directory: how the time budget sized the run


@dataclass(frozen=True)
class Budget:
    """How much work each stage does for one preset. `expected_s` weights the overall ETA."""

    vocab_size: int
    pretrain_steps: int
    pretrain_batch: int
    optimizer: str  # of pretraining and SFT: adamw, or muon (not with --fsdp; it learns faster on the tiny model)
    seq_len: int
    sft_steps: int
    sft_batch: int
    sft_per_task: int
    pair_prompts: int
    dpo_steps: int
    dpo_batch: int
    rl_steps: int
    rl_batch: int  # prompts per step, each sampled `rl_group` times
    rl_group: int
    rl_max_new_tokens: int
    eval_limit: int
    dtype: str
    tokenizer_chars: int  # characters sampled to train the tokenizer
    eval_tokens: int  # held-out tokens scored at each pretraining eval
    expected_s: tuple[float, ...]  # one per stage, in STAGES order
    model_size: str  # the preset's parameter count in words, for the identity answers of the demo data
    # The wall time the run is sized for, and what the calibration (`calibration_command`) measured on the
    # machine `expected_s` comes from. On a slower machine pretraining and SFT take fewer steps so the run still
    # fits (`plan_time`); None: always the preset's steps.
    minutes: float | None = None
    reference_tok_s: float | None = None


# `calibration_command`'s tokens/s on the 2-core Intel Xeon with AMX (bf16) where the tiny budget's expected_s
# were measured.
REF_TOK_S = 15000.0

# The tiny budget's steps fit in 15 minutes on the reference machine (its expected_s are a whole run's stage
# times there; a run on a day the machine ran faster is scaled by its pretraining's pace); on slower CPUs its
# time budget shortens them. 26m and 0.2b are the original Matelike project's
# sizes with budgets meant for one GPU.
BUDGETS: dict[str, Budget] = {
    "micro": Budget(model_size="约100万",
                    vocab_size=2048, pretrain_steps=30, pretrain_batch=4, seq_len=256, sft_steps=20, sft_batch=8,
                    sft_per_task=60, pair_prompts=40, dpo_steps=6, dpo_batch=4, eval_limit=6,
                    rl_steps=4, rl_batch=2, rl_group=4, rl_max_new_tokens=16, dtype="auto",
                    optimizer="muon", tokenizer_chars=300_000, eval_tokens=4096,
                    expected_s=(8, 10, 8, 15, 12, 10, 10, 15, 15, 5)),
    "tiny": Budget(model_size="约160万",
                   vocab_size=6400, pretrain_steps=2400, pretrain_batch=8, seq_len=256, sft_steps=1100,
                   sft_batch=16, sft_per_task=2000, pair_prompts=200, dpo_steps=60, dpo_batch=8, eval_limit=300,
                   rl_steps=100, rl_batch=4, rl_group=16, rl_max_new_tokens=64,
                   dtype="auto", optimizer="muon", tokenizer_chars=8_000_000, eval_tokens=1 << 16,
                   expected_s=(5, 13, 1, 390, 260, 19, 22, 69, 65, 3), minutes=15.0, reference_tok_s=REF_TOK_S),
    "26m": Budget(model_size="约2700万",
                  vocab_size=6400, pretrain_steps=20000, pretrain_batch=32, seq_len=512, sft_steps=4000,
                  sft_batch=32, sft_per_task=4000, pair_prompts=2000, dpo_steps=1000, dpo_batch=16,
                  rl_steps=500, rl_batch=16, rl_group=8, rl_max_new_tokens=128, eval_limit=300, dtype="auto",
                  optimizer="adamw", tokenizer_chars=8_000_000, eval_tokens=1 << 17,
                  expected_s=(10, 60, 30, 3600, 900, 600, 600, 1200, 300, 10)),
    "0.2b": Budget(model_size="约2亿",
                   vocab_size=6400, pretrain_steps=40000, pretrain_batch=32, seq_len=512, sft_steps=6000,
                   sft_batch=32, sft_per_task=4000, pair_prompts=4000, dpo_steps=2000, dpo_batch=16,
                   rl_steps=1000, rl_batch=32, rl_group=8, rl_max_new_tokens=128, eval_limit=300, dtype="auto",
                   optimizer="adamw", tokenizer_chars=8_000_000, eval_tokens=1 << 17,
                   expected_s=(10, 60, 30, 14400, 3600, 1200, 1200, 2400, 600, 10)),
}
MODEL_PRESET = {"micro": "tiny", "tiny": "tiny", "26m": "26m", "0.2b": "0.2b"}


# The stages whose steps a time budget shortens: the two long ones, whose cosine schedules end where they stop.
SCALED: tuple[str, ...] = ("pretrain", "sft")
MIN_SCALE = 0.25  # below a quarter of its steps the model learns too little to be worth the wait
CALIBRATION_STEPS = 12
# A few seconds of calibration read a few percent off: pretraining is shortened only when the prediction
# exceeds what is left by more than this, since SFT's plan, made from pretraining's own wall time, corrects it.
CALIBRATION_TOLERANCE = 0.05


def calibration_command(preset: str) -> list[str]:
    """`matelike bench train` on the preset's model at its pretraining shape and dtype: this machine's pace."""
    b = BUDGETS[preset]
    return ["bench", "train", "--preset", MODEL_PRESET[preset], "--batch-size", str(b.pretrain_batch),
            "--seq-len", str(b.seq_len), "--dtypes", b.dtype, "--no-compile", "--losses", "fused",
            "--memory-preset", "", "--steps", str(CALIBRATION_STEPS), "--warmup", "3", "--peak-seconds", "0.1"]


@dataclass(frozen=True)
class TimePlan:
    """One decision of a time budget, made before a SCALED stage: the steps of the SCALED stages still to run
    multiplied by `scale` (1: the preset's)."""

    stage: str  # the stage about to run
    budget_s: float
    slow: float  # this machine's stage times over the reference machine's
    measured_by: str  # what `slow` comes from
    predicted_s: float  # the stages still to run, at the preset's steps, at this pace
    available_s: float  # what the budget leaves them
    scale: float
    planned_s: float  # the stages still to run at `scale`

    def describe(self) -> str:
        head = f"time budget {_fmt_s(self.budget_s)}, before {self.stage}: {self.measured_by}"
        if self.scale >= 1 and self.predicted_s > self.available_s:
            return (f"{head}; the preset's steps stay (about {_fmt_s(self.predicted_s)} for the "
                    f"{_fmt_s(self.available_s)} left, within what the estimate may be off; SFT plans again)")
        if self.scale >= 1:
            return (f"{head}; the preset's steps fit (about {_fmt_s(self.predicted_s)} of the "
                    f"{_fmt_s(self.available_s)} left)")
        which = " and ".join(("pretraining", "SFT")[SCALED.index(s)] for s in SCALED[SCALED.index(self.stage):])
        over = self.planned_s - self.available_s
        fits = f"; even so about {_fmt_s(over)} more than the budget holds" if over > 1 else ""
        return (f"{head}; the preset's steps would take about {_fmt_s(self.predicted_s)} of the "
                f"{_fmt_s(self.available_s)} left, so {which} run{'s' if ' and ' not in which else ''} "
                f"{self.scale:.0%} of the preset's steps, about {_fmt_s(self.planned_s)}{fits} (`--time-budget 0` "
                f"runs them all)")


def plan_time(b: Budget, slow: float, measured_by: str, budget_s: float, elapsed_s: float, stages: list[str],
              tolerance: float = 0.0) -> TimePlan:
    """Scale the steps of the SCALED stages among `stages` (those still to run, the first a SCALED one) so that
    they fit in what `budget_s` leaves after `elapsed_s`, every stage taking `slow` times its expected time
    (generation, tokenization and evaluation are slower on a slower CPU too). The steps stay the preset's
    while the prediction exceeds what is left by no more than `tolerance` (a share)."""
    exp = dict(zip(STAGES, b.expected_s))
    fixed = sum(exp[s] for s in stages if s not in SCALED) * slow
    scaled = sum(exp[s] for s in stages if s in SCALED) * slow
    available = budget_s - elapsed_s
    scale = 1.0
    if fixed + scaled > available * (1 + tolerance) and scaled:
        # in whole twentieths, so that machines of about the same pace train the same steps
        scale = min(1.0, max(MIN_SCALE, math.floor(20 * (available - fixed) / scaled) / 20))
    return TimePlan(stages[0], budget_s, slow, measured_by, fixed + scaled, available, scale,
                    fixed + scaled * scale)


def stage_commands(out: Path, preset: str, scales: dict[str, float] | None = None) -> dict[str, list[list[str]]]:
    """The `matelike` argument lists of every stage for this run (a stage may run several commands); `scales`
    multiply the steps of SCALED stages (a time budget's plan)."""
    b = BUDGETS[preset]
    if scales:
        b = dataclasses.replace(b, pretrain_steps=max(1, round(b.pretrain_steps * scales.get("pretrain", 1.0))),
                                sft_steps=max(1, round(b.sft_steps * scales.get("sft", 1.0))))
    data, tok, pack = out / "data", out / "tokenizer", out / "pack"
    common = ["--dtype", b.dtype, "--seq-len", str(b.seq_len), "--resume"]
    # The classical baselines (on by default with --data; jieba from `make demo`'s `classical` extra) are
    # the same for every model, and the report shows the final model's: the earlier evals skip them.
    evals = [
        ["eval", "--model", str(out / name), "--data", str(data), "--val", str(data / "pretrain_val.jsonl"),
         "--chat-file", str(data / "chat_test.jsonl"),
         "--limit", str(b.eval_limit), "--out", str(out / "eval" / f"{name}.json"),
         "--predictions", str(out / "eval" / f"{name}_predictions.jsonl"),
         *(["--no-classical"] if name != TRAINED[-1] else [])]
        for name in TRAINED
    ]
    return {
        "data": [["data", "demo", "--out", str(data), "--sft-per-task", str(b.sft_per_task),
                  "--model-size", b.model_size]],
        "tokenizer": [["tokenizer", "train", "--input", str(data / "pretrain.jsonl"), "--out", str(tok),
                       "--vocab-size", str(b.vocab_size), "--max-chars", str(b.tokenizer_chars),
                       "--heldout", str(data / "pretrain_val.jsonl")]],
        "pack": [["data", "pack", "--tokenizer", str(tok), "--input", str(data / "pretrain.jsonl"),
                  "--out", str(pack / "pretrain.bin"), "--val-input", str(data / "pretrain_val.jsonl"),
                  "--val-out", str(pack / "pretrain_val.bin")]],
        "pretrain": [["pretrain", "--preset", MODEL_PRESET[preset], "--data", str(pack / "pretrain.bin"),
                      "--val", str(pack / "pretrain_val.bin"), "--tokenizer", str(tok), "--out", str(out / "pretrain"),
                      "--max-steps", str(b.pretrain_steps), "--batch-size", str(b.pretrain_batch),
                      "--warmup-steps", str(max(1, b.pretrain_steps // 20)), "--lr", "2e-3", "--min-lr", "2e-4",
                      "--optimizer", b.optimizer,
                      "--eval-every", str(max(1, b.pretrain_steps // 5)), "--eval-tokens", str(b.eval_tokens), *common]],
        # SFT reads its data packed once (`data pack --format sft`), so the demo exercises the path large sets take.
        "sft": [["data", "pack", "--format", "sft", "--tokenizer", str(out / "pretrain"), "--input",
                 str(data / "sft.jsonl"), "--out", str(pack / "sft.bin"), "--seq-len", str(b.seq_len), "--quiet"],
                ["sft", "--init", str(out / "pretrain"), "--data", str(pack / "sft.bin"), "--out", str(out / "sft"),
                 "--max-steps", str(b.sft_steps), "--batch-size", str(b.sft_batch), "--freeze", "none",
                 "--warmup-steps", str(max(1, b.sft_steps // 20)), "--lr", "1e-3", "--min-lr", "1e-4",
                 "--optimizer", b.optimizer, *common]],
        "pairs": [["dpo", "make-pairs", "--model", str(out / "sft"), "--data", str(data / "tasks_train.jsonl"),
                   "--out", str(out / "pairs" / "pairs.jsonl"), "--limit", str(b.pair_prompts)]],
        # DPO and RL read their data packed too (`data pack --format dpo|prompts`), as large sets would.
        "dpo": [["data", "pack", "--format", "dpo", "--tokenizer", str(out / "sft"), "--input",
                 str(out / "pairs" / "train.jsonl"), "--out", str(pack / "dpo.bin"), "--seq-len", str(b.seq_len),
                 "--quiet"],
                ["dpo", "--init", str(out / "sft"), "--data", str(pack / "dpo.bin"),
                 "--val", str(out / "pairs" / "val.jsonl"), "--out", str(out / "dpo"),
                 "--max-steps", str(b.dpo_steps), "--batch-size", str(b.dpo_batch),
                 "--warmup-steps", str(max(1, b.dpo_steps // 10)), "--lr", "3e-5", "--min-lr", "3e-6", "--rpo-alpha", "1.0",
                 "--eval-every", str(max(1, b.dpo_steps // 4)), *common]],
        # GRPO on the task rewards (with their reward-hack guards) from the DPO model, on the prompts of the
        # tasks with the most room (rl_train.jsonl). Sampling at 0.5: the guarded entity reward charges false
        # positives, and hotter samples guess worse, so `无` wins their groups and greedy answers drift to it
        # (the README gives the temperature sweep on the development split).
        "rl": [["data", "pack", "--format", "prompts", "--tokenizer", str(out / "dpo"), "--input",
                str(data / "rl_train.jsonl"), "--out", str(pack / "rl_prompts.bin"), "--quiet"],
               ["rl", "--init", str(out / "dpo"), "--data", str(pack / "rl_prompts.bin"), "--out", str(out / "rl"),
                "--algo", "grpo", "--reward", "task", "--group", str(b.rl_group),
                "--max-new-tokens", str(b.rl_max_new_tokens), "--temperature", "0.5",
                "--max-steps", str(b.rl_steps), "--batch-size", str(b.rl_batch),
                "--warmup-steps", str(max(1, b.rl_steps // 20)), "--lr", "3e-5", "--min-lr", "3e-6", *common]],
        "eval": evals,
        "report": [["report", str(out)]],
    }


def split_pairs(pairs: Path, train: Path, val: Path, val_every: int = 10) -> tuple[int, int]:
    """Hold out every `val_every`-th pair (deterministic) so DPO's reward accuracy is measured on unseen pairs."""
    n_train = n_val = 0
    with open(pairs, encoding="utf-8") as src, open(train, "w", encoding="utf-8") as t, \
            open(val, "w", encoding="utf-8") as v:
        for i, line in enumerate(src):
            if not line.strip():
                continue
            if i % val_every == val_every - 1:
                v.write(line)
                n_val += 1
            else:
                t.write(line)
                n_train += 1
    if n_train == 0:
        raise RuntimeError(f"{pairs}: no preference pairs were made; the SFT model may already answer every "
                           f"prompt correctly, or the pair stage found no prompts")
    if n_val == 0:  # too few pairs to hold any out: evaluate on the training ones and say so in the file name
        shutil.copyfile(train, val)
    return n_train, n_val


PACE_PRIOR_S = 60.0


def _fmt_s(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Pipeline:
    """Runs the stages in order with skip-if-complete, resume and an overall progress line with ETA."""

    def __init__(self, out: Path, preset: str, stages: list[str], force: bool,
                 runner: Callable[[list[str]], int] | None = None, time_budget_min: float | None = None,
                 calibrate: Callable[[list[str]], float | None] | None = None) -> None:
        """`time_budget_min`: None takes the preset's (`Budget.minutes`), 0 turns it off. `calibrate(argv)`
        runs the calibration command and returns its tokens/s (None when it failed)."""
        self.out, self.preset, self.stages, self.force = out, preset, stages, force
        self.budget = BUDGETS[preset]
        self.runner = runner or self._subprocess
        self.calibrate = calibrate or self._calibrate_subprocess
        self.markers = out / MARKERS
        minutes = self.budget.minutes if time_budget_min is None else time_budget_min
        self.budget_s = minutes * 60 if minutes and self.budget.reference_tok_s else None
        self.plans: list[dict[str, Any]] = []  # the time budget's decisions, kept in TIME_PLAN

    @staticmethod
    def _subprocess(argv: list[str]) -> int:
        return subprocess.call([sys.executable, "-m", "matelike", *argv])

    @staticmethod
    def _calibrate_subprocess(argv: list[str]) -> float | None:
        done = subprocess.run([sys.executable, "-m", "matelike", *argv], capture_output=True, text=True)
        try:
            return float(json.loads(done.stdout.strip().splitlines()[-1])["runs"][0]["tokens_per_s"])
        except (IndexError, KeyError, TypeError, ValueError):
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            print(f"time budget: the calibration failed ({tail[0]}); running the preset's steps", file=sys.stderr)
            return None

    @property
    def plan_path(self) -> Path:
        return self.out / TIME_PLAN

    @property
    def scales(self) -> dict[str, float]:
        """Each SCALED stage's share of its steps: the last decision made before it or an earlier stage."""
        out: dict[str, float] = {}
        for plan in self.plans:
            for stage in SCALED[SCALED.index(plan["stage"]):]:
                out[stage] = plan["scale"]
        return out

    @property
    def slow(self) -> float:
        return self.plans[-1]["slow"] if self.plans else 1.0

    def _plan(self, stage: str, index: int, started: float, observed: dict[str, float]) -> None:
        """Before a SCALED stage: size the stages still to run to the time budget. Before pretraining the pace
        is a few seconds of `bench train`; before SFT it is pretraining's own wall time when this invocation
        ran it from its start. Decisions are kept in the run directory, so a resumed run keeps the steps it
        started with (exact resume)."""
        if any(p["stage"] == stage for p in self.plans) or self.budget_s is None:
            return
        exp = dict(zip(STAGES, self.budget.expected_s))
        if stage == SCALED[0]:
            argv = calibration_command(self.preset)
            print("$ matelike " + " ".join(argv), flush=True)
            tok_s = self.calibrate(argv)
            if not tok_s:
                return
            assert self.budget.reference_tok_s
            slow = self.budget.reference_tok_s / tok_s
            how = f"{tok_s:,.0f} training tokens/s here, {self.budget.reference_tok_s:,.0f} on the reference machine"
            tolerance = CALIBRATION_TOLERANCE
        else:
            before = SCALED[SCALED.index(stage) - 1]
            if before not in observed:
                return
            share = self.scales.get(before, 1.0)
            slow = observed[before] / (exp[before] * share)
            how = f"{before} took {_fmt_s(observed[before])}, {slow:.2f}x the reference machine's time"
            tolerance = 0.0
        plan = plan_time(self.budget, slow, how, self.budget_s, time.time() - started, self.stages[index:],
                         tolerance)
        self.plans.append({**dataclasses.asdict(plan), "describe": plan.describe()})
        self.plan_path.write_text(json.dumps(self.plans, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(plan.describe(), flush=True)

    def done(self, stage: str) -> bool:
        return (self.markers / f"{stage}.json").is_file()

    def _stage_dirs(self, stage: str) -> list[Path]:
        return {"data": [self.out / "data"], "tokenizer": [self.out / "tokenizer"], "pack": [self.out / "pack"],
                "pretrain": [self.out / "pretrain"], "sft": [self.out / "sft"], "pairs": [self.out / "pairs"],
                "dpo": [self.out / "dpo"], "rl": [self.out / "rl"], "eval": [self.out / "eval"], "report": []}[stage]

    def _eta(self, index: int, started: float, done_s: dict[str, float]) -> str:
        planned = STAGES[STAGES.index(SCALED[0]):]
        scales, slow = self.scales, self.slow
        exp = {s: e * scales.get(s, 1.0) * (slow if s in planned else 1.0)
               for s, e in zip(STAGES, self.budget.expected_s)}
        # The expected stage times (from pretraining on, at the pace the time budget measured, with its steps)
        # scaled by this machine's pace on the stages it ran. The pace is shrunk
        # towards 1 by a minute of expected time, so that a few-second stage running 2x slow does not double
        # the estimate; it is printed, so that when the estimate moves the reason is on the line.
        ran_exp = sum(exp[s] for s in done_s)
        pace = (sum(done_s.values()) + PACE_PRIOR_S) / (ran_exp + PACE_PRIOR_S)
        remaining = sum(exp[s] for s in self.stages[index:]) * pace
        return f"elapsed {_fmt_s(time.time() - started)}, ETA {_fmt_s(remaining)} at {pace:.2f}x the expected pace"

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.markers.mkdir(exist_ok=True)
        if self.force and SCALED[0] in self.stages:
            self.plan_path.unlink(missing_ok=True)  # pretraining starts over: so does the plan
        if self.plan_path.is_file():
            self.plans = json.loads(self.plan_path.read_text(encoding="utf-8"))
        started, done_s = time.time(), {}
        from_scratch: dict[str, float] = {}  # wall time of the SCALED stages this invocation ran from their start
        for i, stage in enumerate(self.stages):
            head = f"[{i + 1}/{len(self.stages)}] {stage}"
            if self.done(stage) and not self.force:
                print(f"{head}: complete, skipped ({self.markers / (stage + '.json')})", flush=True)
                continue
            if stage in SCALED:
                self._plan(stage, i, started, from_scratch)
            fresh = self.force or not any(d.exists() for d in self._stage_dirs(stage))
            cmds = stage_commands(self.out, self.preset, self.scales)
            if self.force or stage in ("data", "tokenizer", "pack", "eval"):
                # Quick stages restart from scratch; training stages and make-pairs resume what they left.
                for d in self._stage_dirs(stage):
                    shutil.rmtree(d, ignore_errors=True)
            (self.markers / f"{stage}.json").unlink(missing_ok=True)
            print(f"{head}: starting ({self._eta(i, started, done_s)})", flush=True)
            t0 = time.time()
            if stage == "dpo":
                try:
                    n_train, n_val = split_pairs(self.out / "pairs" / "pairs.jsonl",
                                                 self.out / "pairs" / "train.jsonl", self.out / "pairs" / "val.jsonl")
                except (OSError, RuntimeError) as e:
                    print(f"{head}: {e}", file=sys.stderr)
                    return 1
                print(f"{head}: {n_train} training pairs, {n_val} held-out pairs", flush=True)
            for argv in cmds[stage]:
                print("$ matelike " + " ".join(argv), flush=True)
                rc = self.runner(argv)
                if rc != 0:
                    print(f"{head}: failed with exit code {rc}; fix the cause and re-run the same command to "
                          f"continue from here", file=sys.stderr)
                    return rc
            wall = time.time() - t0
            done_s[stage] = wall
            if stage in SCALED and fresh:
                from_scratch[stage] = wall
            marker = {"stage": stage, "preset": self.preset, "wall_s": round(wall, 2),
                      "commands": [["matelike", *a] for a in cmds[stage]], "finished": time.time()}
            (self.markers / f"{stage}.json").write_text(json.dumps(marker, ensure_ascii=False, indent=2) + "\n",
                                                       encoding="utf-8")
            print(f"{head}: done in {_fmt_s(wall)}", flush=True)
        print(f"all stages complete in {_fmt_s(time.time() - started)}; report: {self.out / 'report.md'}; "
              f"chat with: matelike chat --model {self.out / TRAINED[-1]}", flush=True)
        return 0


def _parse_stages(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return [s for s in STAGES if s in names]  # always in pipeline order


def _cmd_run(args: argparse.Namespace) -> int:
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget >= 0):
        print("error: --time-budget must be >= 0 minutes (0: off)", file=sys.stderr)
        return 2
    return Pipeline(Path(args.out), args.preset, args.stages, args.force, time_budget_min=args.time_budget).run()


def add_cli(table: "CommandTable") -> None:
    p = table.command("run", "run the whole pipeline on the embedded demo data", _cmd_run)
    p.add_argument("--out", required=True, help="output directory; each stage gets a folder inside")
    p.add_argument("--preset", default="tiny", choices=sorted(BUDGETS),
                   help="model size and budget: tiny (CPU, <= 15 min), micro (a smoke test), 26m, 0.2b (GPU)")
    p.add_argument("--stages", type=_parse_stages, default=list(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--force", action="store_true", help="redo stages even if they completed")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="wall time to size the run for: before pretraining a few seconds of `bench train` measure "
                        "this machine's pace and, if the preset's steps would not fit, pretraining and SFT take "
                        "fewer (default: the preset's, 15 for tiny; 0 = always the preset's steps)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per stage (default: torch's choice)")

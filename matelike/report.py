"""`matelike report DIR`: the report card of a `matelike run` folder (DIR/report.md plus loss and reward PNGs)."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matelike.run import STAGES, TIME_PLAN, TRAINED

if TYPE_CHECKING:
    from matelike.cli import CommandTable


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a killed run) is ignored."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _last(rows: list[dict[str, Any]], key: str) -> Any:
    for r in reversed(rows):
        if r.get(key) is not None:
            return r[key]
    return None


def _num(v: Any, fmt: str = "{:.4f}") -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return str(v)


def _params(model_dir: Path) -> int | None:
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        return None
    from safetensors import safe_open

    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        return None
    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += n
    return total


def plot_curves(run: Path, stage: str, rows: list[dict[str, Any]], keys: tuple[str, ...] = ("loss", "val_loss"),
                ylabel: str = "loss") -> Path | None:
    """PNG `run/{ylabel}_{stage}.png` of the metrics `keys` against step; None when none of them was logged."""
    series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None and "step" in r] for k in keys}
    series = {k: points for k, points in series.items() if points}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for k, points in series.items():
        sparse = len(points) < 20  # evaluations are a few points: show them as markers
        ax.plot(*zip(*points), marker="o" if sparse else None, label=k.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{stage} {ylabel}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run / f"{ylabel}_{stage}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _reward_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The per-task (`reward_<task>`) and per-function (`reward_fn_<name>`) rewards an rl metrics.jsonl logs."""
    return sorted({k for r in rows for k in r if k.startswith("reward_") and k != "reward_std"})


def _rl_lines(run: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The RL stage in words: the reward at the start and the end, per task, beside the known cheap answers."""
    if not rows:
        return []
    k = max(1, min(10, len(rows) // 4))  # a window of steps: one step's reward is a noisy mean of a few groups
    tasks = sorted({key[len("reward_"):] for key in _reward_keys(rows) if not key.startswith("reward_fn_")})

    def mean(part: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    def change(key: str) -> str:
        return f"{_num(mean(rows[:k], key), '{:.3f}')} → {_num(mean(rows[-k:], key), '{:.3f}')}"

    parts = [f"reward {change('reward')}"] + [f"{t} {change('reward_' + t)}" for t in tasks]
    lines = ["", f"RL training reward, mean of the first and the last {k} steps: " + ", ".join(parts) + "."]
    info_path = run / "rl" / "rl_data.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    hacks = info.get("reward_hack_references")
    if hacks:
        refs = [f"{name.replace('_', ' ')} {hacks[name]:.3f} ({_num(hacks.get(name + '_unguarded'), '{:.3f}')})"
                for name in hacks if not name.endswith("_unguarded")]
        lines += ["", "What the known cheap answers earn on the RL prompts under the guarded task reward (and under "
                      "the plain per-item score): " + ", ".join(refs) + "."]
    return lines


def _with_ci(value: Any, ci: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if isinstance(ci, list) and len(ci) == 2 else f"{value:.4f}"


def _eval_metrics(result: dict[str, Any]) -> dict[str, str]:
    """An eval JSON as {row name: formatted value}: each task's main metric with its 95% interval, the chat
    behaviour figures, held-out loss and C-Eval accuracy."""
    from matelike.eval.scoring import MAIN_METRIC

    flat: dict[str, str] = {}
    for task, m in (result.get("tasks") or {}).items():
        key = MAIN_METRIC.get(task)
        if isinstance(m, dict) and key in m:
            flat[f"{task} {key} (n={m.get('n')})"] = _with_ci(m[key], m.get("ci95"))
    for task, m in (result.get("constrained") or {}).items():
        key = MAIN_METRIC.get(task)
        if isinstance(m, dict) and key in m:
            flat[_constrained_row(task, key, m.get("n"))] = _with_ci(m[key], m.get("ci95"))
    chat = result.get("chat") or {}
    if "open" in chat:
        o = chat["open"]
        flat[f"chat: task-format leak on open prompts (n={o['n']}, lower is better)"] = _with_ci(
            o["leak"]["rate"], o["leak"]["ci95"])
        if o["identity"]["n"]:
            flat[f"chat: identity questions naming the model (n={o['identity']['n']})"] = _with_ci(
                o["identity"]["rate"], o["identity"]["ci95"])
        for k in ("char_f1", "rouge_l"):
            flat[f"chat: reply {k} vs reference (n={o['n']})"] = _with_ci(o[k]["mean"], o[k]["ci95"])
    for task, m in (chat.get("later_turn_tasks") or {}).items():
        key = MAIN_METRIC[task]
        flat[f"{task} {key}, asked in a later turn (n={m['n']})"] = _with_ci(m[key], m.get("ci95"))
    held = result.get("heldout") or result.get("val") or {}
    if isinstance(held, dict):
        for k in ("loss", "bpb", "val_loss", "val_bpb"):
            if isinstance(held.get(k), (int, float)):
                flat[f"held-out {k}"] = f"{held[k]:.4f}"
    for name, metrics in (result.get("ceval") or {}).items():
        if isinstance(metrics, dict) and isinstance(metrics.get("accuracy"), (int, float)):
            flat[f"C-Eval {name} accuracy"] = f"{metrics['accuracy']:.4f}"
    return flat


def _constrained_row(task: str, key: str, n: Any) -> str:
    from matelike.eval import CONSTRAINED_TASKS

    return f"{task} {key}, {CONSTRAINED_TASKS.get(task, 'answer constrained')} (n={n})"


def _references(section: dict[str, Any], result: dict[str, Any]) -> dict[str, str]:
    """A reference's scores (rule or classical) under `_eval_metrics`' row names; its answers already have the
    shape constrained decoding enforces, so its score stands in the constrained rows too."""
    return _eval_metrics({"tasks": section,
                          "constrained": {t: section[t] for t in result.get("constrained") or {} if t in section}})


def _baseline_metrics(result: dict[str, Any]) -> dict[str, str]:
    """The rule baselines under the same row names as `_eval_metrics`."""
    flat = _references(result.get("baselines") or {}, result)
    o = (result.get("chat") or {}).get("open")
    if o:
        for k in ("char_f1", "rouge_l"):
            flat[f"chat: reply {k} vs reference (n={o['n']})"] = _with_ci(o["baseline"][k]["mean"],
                                                                          o["baseline"][k]["ci95"])
    return flat


def _task_predictions(path: Path) -> dict[Any, list[dict[str, Any]]]:
    """An eval predictions file's task items (not the chat ones), by task and then the constrained answers by
    `(task, "constrained")`, in file order."""
    out: dict[Any, list[dict[str, Any]]] = {}
    for row in read_metrics(path):
        if isinstance(row.get("task"), str) and row.get("kind") in (None, "constrained"):
            key = row["task"] if row.get("kind") is None else (row["task"], "constrained")
            out.setdefault(key, []).append(row)
    return out


def _differences(run: Path, names: list[str]) -> list[str]:
    """Each model's main metric per task minus the previous model's, on the same items, with the paired
    bootstrap interval (`eval.intervals.task_difference`); [] when fewer than two models have predictions."""
    from matelike.eval.intervals import task_difference
    from matelike.eval.scoring import MAIN_METRIC

    preds = {n: _task_predictions(run / "eval" / f"{n}_predictions.jsonl") for n in names}
    names = [n for n in names if preds[n]]
    columns: dict[str, dict[str, str]] = {}
    for a, b in zip(names, names[1:]):
        col = columns.setdefault(f"{b} − {a}", {})
        for which, rows_b in preds[b].items():
            rows_a = preds[a].get(which, [])
            if [(r["prompt"], r["answer"]) for r in rows_a] != [(r["prompt"], r["answer"]) for r in rows_b]:
                continue  # not the same items: no paired comparison
            task = which if isinstance(which, str) else which[0]
            diff, (lo, hi) = task_difference(task, [r["answer"] for r in rows_b], [r["prediction"] for r in rows_a],
                                             [r["prediction"] for r in rows_b])
            key, n = MAIN_METRIC[task], len(rows_b)
            row = f"{task} {key} (n={n})" if isinstance(which, str) else _constrained_row(task, key, n)
            col[row] = f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    keys = list(dict.fromkeys(k for c in columns.values() for k in c))
    if not keys:
        return []
    lines = ["", "## Differences between consecutive models (held-out)", "",
             "Each model minus the one before it on the same items, with the 95% paired bootstrap interval (both "
             "models' answers to an item resampled together): a difference is real where its interval excludes 0.",
             "", "| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {k} | " + " | ".join(c.get(k, "–") for c in columns.values()) + " |" for k in keys]
    return lines


def build_report(run: Path) -> str:
    """Writes run/report.md (and the PNGs) and returns its text."""
    run = Path(run)
    lines = [f"# Matelike run report: `{run}`", ""]
    order = {name: i for i, name in enumerate(STAGES)}  # pipeline order, so the commands run top to bottom
    paths = sorted((run / ".stages").glob("*.json"), key=lambda p: (order.get(p.stem, len(order)), p.stem))
    markers = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in paths}

    lines += ["## Stages", "", "| stage | parameters | dtype | tokens seen | wall time | tokens/s | final train loss | "
              "final val loss |", "|---|---|---|---|---|---|---|---|"]
    curves: list[tuple[str, Path]] = []
    for stage in TRAINED:
        rows = read_metrics(run / stage / "metrics.jsonl")
        params = _params(run / stage)
        wall = markers.get(stage, {}).get("wall_s")
        lines.append(f"| {stage} | {_num(params, '{:,}')} | {_num(_last(rows, 'dtype'))} | "
                     f"{_num(_last(rows, 'tokens'), '{:,}')} | "
                     f"{_num(wall, '{:.0f} s')} | {_num(_last(rows, 'tokens_per_s'), '{:,.0f}')} | "
                     f"{_num(_last(rows, 'loss'))} | {_num(_last(rows, 'val_loss'))} |")
        png = plot_curves(run, stage, rows)
        if png is not None:
            curves.append((f"{stage} loss", png))
    dpo_rows = read_metrics(run / "dpo" / "metrics.jsonl")
    if _last(dpo_rows, "val_reward_accuracy") is not None:
        lines += ["", f"DPO on held-out pairs: reward accuracy {_num(_last(dpo_rows, 'val_reward_accuracy'))}, "
                      f"reward margin {_num(_last(dpo_rows, 'val_reward_margin'))}."]
    rl_rows = read_metrics(run / "rl" / "metrics.jsonl")
    lines += _rl_lines(run, rl_rows)
    reward_png = plot_curves(run, "rl", rl_rows, ("reward", *_reward_keys(rl_rows)), ylabel="reward")
    if reward_png is not None:
        curves.append(("rl reward", reward_png))
    other = [s for s in markers if s not in TRAINED]
    if other:
        lines += ["", "Other stages: " + ", ".join(f"{s} {markers[s].get('wall_s', 0):.0f} s" for s in other)]

    if curves:
        lines += ["", "## Curves", ""]
        lines += [f"![{name}]({png.name})" for name, png in curves]

    evals = {name: json.loads((run / "eval" / f"{name}.json").read_text(encoding="utf-8"))
             for name in TRAINED if (run / "eval" / f"{name}.json").is_file()}
    if evals:
        flat = {name: _eval_metrics(r) for name, r in evals.items()}
        # Every model is scored on the same items, so one set of rule-based baselines serves the whole table.
        final_eval = list(evals.values())[-1]  # the last stage's model
        if final_eval.get("baselines"):
            flat["rule baseline"] = _baseline_metrics(final_eval)
        classical = final_eval.get("classical") or {}
        if classical:
            flat["classical"] = _references(classical, final_eval)
        keys = list(dict.fromkeys(k for f in flat.values() for k in f))
        intro = ("Each figure with its 95% interval (Wilson for rates, bootstrap over items otherwise); the rule "
                 "baseline reads no model: the majority label, every character a word, always `无`, another "
                 "item's real continuation or reply.")
        if final_eval.get("constrained"):
            intro += (" The rows 'held to' score the same items answered under constrained decoding: for "
                      "segmentation only tokens that go on spelling the sentence, with spaces between its "
                      "characters, can be chosen, so the model decides where words end and cannot miscopy; for "
                      "entities every name must be a span of the sentence. The rule's and the classical tools' "
                      "answers always have these shapes.")
        if classical:
            intro += (" The classical column is what standard tools score on the same items: " + "; ".join(
                f"{task}: {m.get('method', '?')}" for task, m in classical.items()) + ".")
        lines += ["", "## Evaluation (held-out)", "", intro, "", "| metric | " + " | ".join(flat) + " |",
                  "|---|" + "---|" * len(flat)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(flat[n].get(k, "–") for n in flat) + " |")
        lines += _differences(run, list(evals))
        samples = [s for s in (final_eval.get("samples") or {}).values() if s]
        if samples:
            lines += ["", "## Sample answers (final model)", ""]
            for s in samples[:3]:
                lines += [f"**{s.get('task', '')}** — prompt:", "", "> " + str(s.get("prompt", "")).replace("\n", "\n> "),
                          "", "model: " + str(s.get("prediction", "")).replace("\n", " "),
                          "", "gold: " + str(s.get("answer", "")).replace("\n", " "), ""]

    import torch

    from matelike.device import cpu_description

    lines += ["", "## Machine", "",
              f"- CPU: {cpu_description()}, {os.cpu_count()} cores, "
              f"torch threads {torch.get_num_threads()}",
              f"- GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
              f"- Python {platform.python_version()}, torch {torch.__version__}",
              "- dtype: each training stage's column above (what `--dtype auto` chose on this machine)"]
    plan = run / TIME_PLAN
    if plan.is_file():
        lines += ["- " + decision["describe"] for decision in json.loads(plan.read_text(encoding="utf-8"))]
    cmds = [" ".join(c) for s in markers.values() for c in s.get("commands", [])]
    if cmds:
        lines += ["", "## Commands to reproduce", "", "```"] + cmds + ["```"]
    text = "\n".join(lines) + "\n"
    (run / "report.md").write_text(text, encoding="utf-8")
    return text


def _cmd_report(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.is_dir():
        print(f"{run}: no such run folder", flush=True)
        return 2
    build_report(run)
    print(f"wrote {run / 'report.md'}")
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.command("report", "write the report card (report.md + loss curves) of a run folder", _cmd_report)
    p.add_argument("run", help="folder written by `matelike run`")

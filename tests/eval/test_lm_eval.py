"""lm-eval (EleutherAI's harness, Hugging Face backend) on a saved directory: the README's task YAML, run by the
real `lm_eval` command, gives `matelike eval --ceval`'s accuracy and picks the same letter on every item."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CORPUS

README = Path(__file__).resolve().parents[2] / "README.md"
DATA_PLACEHOLDER = "/path/to/ceval_val.csv"


def readme_task_yaml() -> str:
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
              if "task: matelike_ceval" in b]
    assert len(blocks) == 1, "the README shows one matelike_ceval task"
    assert DATA_PLACEHOLDER in blocks[0]
    return blocks[0]


def write_items(path: Path, n: int = 24) -> list[str]:
    """A C-Eval layout CSV of `n` questions with short options from the tiny corpus; returns the answers."""
    sentences = [s for s in TINY_CORPUS if not s.isascii()]
    answers = []
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "A", "B", "C", "D", "answer"])
        for i in range(n):
            options = [sentences[(i + k) % len(sentences)][k : k + 4 + i % 3] for k in range(4)]
            answers.append("ABCD"[(i * 7) % 4])
            w.writerow([f"第{i}题：{sentences[i % len(sentences)][:6 + i % 5]}", *options, answers[-1]])
    return answers


@pytest.mark.slow
def test_lm_eval_reads_our_directory_and_agrees_with_matelike_eval(make_chat_model, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")
    from matelike.cli import main

    model_dir = make_chat_model(max_seq_len=512, name="mc-model")
    items = tmp_path / "ceval_val.csv"
    answers = write_items(items)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "matelike_ceval.yaml").write_text(readme_task_yaml().replace(DATA_PLACEHOLDER, str(items)),
                                               encoding="utf-8")
    out = tmp_path / "lm-eval-out"
    # Offline as the README says, with the datasets cache under the test's folder.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={model_dir},dtype=float32", "--include_path", str(tasks), "--tasks",
                          "matelike_ceval", "--batch_size", "8", "--device", "cpu", "--output_path", str(out),
                          "--log_samples"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text(encoding="utf-8"))
    samples = [json.loads(line) for line in next(out.rglob("samples_matelike_ceval_*.jsonl")).read_text(
        encoding="utf-8").splitlines()]
    assert len(samples) == len(answers)

    ours_json = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model_dir), "--ceval", str(items), "--prompt-format", "plain", "--quiet",
                 "--out", str(ours_json)]) == 0
    ours = json.loads(ours_json.read_text(encoding="utf-8"))["ceval"][str(items)]
    assert ours["n"] == len(answers)
    assert results["results"]["matelike_ceval"]["acc,none"] == pytest.approx(ours["accuracy"])

    # Item by item: the same letter, and the same log-likelihoods up to one constant per item (lm-eval scores
    # the prompt's trailing newline as part of every answer).
    from matelike.data.records import BadRecordReport
    from matelike.eval import CHOICES, choice_logprobs, encode_prompt, load_mc_rows, mc_prompt
    from matelike.model.io import load_model

    model, tokenizer = load_model(model_dir, device="cpu", dtype="fp32")
    rows = load_mc_rows(items, BadRecordReport())
    margins = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        row = rows[sample["doc_id"]]
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        mine = choice_logprobs(model, tokenizer, encode_prompt(tokenizer, mc_prompt(row), "plain"))
        shift = theirs[0] - mine[0]
        assert [t - shift for t in theirs] == pytest.approx(mine, abs=1e-3), sample["doc_id"]
        assert max(range(4), key=theirs.__getitem__) == max(range(4), key=mine.__getitem__)
        assert sample["acc"] == float(CHOICES[max(range(4), key=mine.__getitem__)] == row["answer"])
        margins.append(mine[1] - mine[0])
    # A random model tends to prefer one letter whatever the question, but how much depends on the item: the
    # comparison above is of scores that the prompt really moves, not of one number repeated.
    assert max(margins) - min(margins) > 0.1

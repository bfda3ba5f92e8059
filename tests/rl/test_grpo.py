"""The GRPO stage: rollouts (stop token trained, truncation masked, old log-probs), learning a toy reward, the
command line (bad records, exact resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matelike.rl import GRPOTask
from matelike.rl.rollout import collate_rows, sample_completions

from rl_common import TASK_RECORDS, chat_model as _model, read_metrics as _metrics, task_prompts as _prompts
from rl_common import write_jsonl as _write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")





def test_the_stop_token_is_trained_and_truncated_completions_can_be_masked(make_chat_model) -> None:
    model, tok = _model(make_chat_model)
    prompt = tok.encode_chat([{"role": "user", "content": "你好"}], add_generation_prompt=True)[0]
    # Half the vocabulary stops: completions end quickly with a stop token.
    stops = list(range(0, tok.vocab_size, 2))
    comps = sample_completions(model, [prompt] * 6, list(range(6)), max_new_tokens=20, temperature=1.0, top_k=None,
                               top_p=None, stop_ids=stops, max_batch=6)
    stopped = [c for c in comps if c.stopped]
    assert stopped and all(c.tokens[-1] in stops and not any(t in stops for t in c.tokens[:-1]) for c in stopped)
    rows = collate_rows([prompt] * len(stopped), [c.tokens for c in stopped], [True] * len(stopped), tok.pad_id)
    for i, c in enumerate(stopped):
        trained = rows["targets"][i][rows["targets"][i] != -100].tolist()
        assert trained == c.tokens  # the answer and its stop token
        assert rows["input_ids"][i, : len(prompt) + len(c.tokens) - 1].tolist() == prompt + c.tokens[:-1]
    # No stop ids: every completion runs to the limit, and --mask-truncated leaves them out of the loss.
    long = sample_completions(model, [prompt] * 2, [0, 1], max_new_tokens=3, temperature=1.0, top_k=None,
                              top_p=None, stop_ids=(), max_batch=2)
    assert [len(c.tokens) for c in long] == [3, 3] and not any(c.stopped for c in long)
    kept = collate_rows([prompt] * 2, [c.tokens for c in long], [True, True], tok.pad_id)
    masked = collate_rows([prompt] * 2, [c.tokens for c in long], [False, False], tok.pad_id)
    assert (kept["targets"] != -100).sum() == 6 and (masked["targets"] != -100).sum() == 0


def test_the_stop_token_gets_gradient_in_the_loss(make_chat_model) -> None:
    model, tok = _model(make_chat_model)
    task = GRPOTask(model, _prompts(tok), [lambda prompts, completions, **kw: [float(len(c)) for c in completions]],
                    decode=tok.decode, stop_ids=list(range(0, tok.vocab_size, 2)), pad_id=tok.pad_id,
                    batch_size=2, group=4, max_new_tokens=8, seed=3)
    batch, _ = next(task.batches(0, 1, None))
    targets = batch["targets"]
    last = [row[row != -100][-1].item() for row in targets if (row != -100).any()]
    assert any(t % 2 == 0 for t in last)  # some completions end in a (trained) stop token
    loss, metrics, n = task.loss(model, batch)
    loss.backward()
    assert n == int((targets != -100).sum()) and metrics["ratio"] == 1.0


def test_later_updates_use_the_log_probs_the_rollout_was_sampled_with(make_chat_model) -> None:
    model, tok = _model(make_chat_model)
    reward = lambda prompts, completions, **kw: [float(len(c) % 3) for c in completions]  # noqa: E731
    task = GRPOTask(model, _prompts(tok), [reward], decode=tok.decode, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                    batch_size=2, group=4, max_new_tokens=6, updates_per_rollout=2, temperature=0.8, top_k=50,
                    seed=5)
    it = task.batches(0, 1, None)
    first, cur1 = next(it)
    second, cur2 = next(it)
    assert first["first_update"] and not second["first_update"]
    assert cur1["update"] == 1 and cur1["saved"] is not None and cur1["next"] == 2
    assert cur2 == {"position": 2, "next": None, "update": 0, "micro": 0, "saved": None}
    # Same weights: the stored log-probs are the ones the loss computes, so the ratio is 1 on this path too.
    _, metrics, _ = task.loss(model, second)
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(first["input_ids"], second["input_ids"])


def test_constrained_rollouts_spell_the_sentence_and_the_loss_reads_their_distribution(make_chat_model) -> None:
    """--constrained: every segmentation sample spells the prompt's sentence and every entity sample names spans
    of it; the loss's log-probs are those of the masked distribution (recomputed here by replaying the
    constraint), the stored rollout of a second update gives ratio 1, and it survives the checkpoint's plain
    values."""
    from matelike.eval import answer_constraint
    from matelike.eval.scoring import parse_entities
    from matelike.rl import _constraints_of, _from_plain
    from matelike.rl.losses import token_logps

    model, tok = _model(make_chat_model)
    records = [r for r in TASK_RECORDS if r["task"] in ("segmentation", "entities")]
    prompts = _prompts(tok, records)
    task = GRPOTask(model, prompts, [lambda prompts, completions, **kw: [float(len(c)) for c in completions]],
                    decode=tok.decode, stop_ids=tok.stop_ids, pad_id=tok.pad_id, batch_size=2, group=4,
                    max_new_tokens=40, updates_per_rollout=2, temperature=1.5, seed=2,
                    constraint_for=_constraints_of(prompts, tok))
    it = task.batches(0, 1, None)
    first, cur = next(it)
    groups = task._sample_groups([0, 1])  # the same rollout again: seeds come from the stream positions
    for g in groups:
        sentence = g["shape"].target.decode() if g["task"] == "segmentation" else g["shape"].text.decode()
        for c in g["comps"]:
            assert c.stopped
            answer = tok.decode(c.tokens[:-1])
            if g["task"] == "segmentation":
                assert answer.replace(" ", "") == sentence
            else:
                assert all(name in sentence for _, name in parse_entities(answer))
    # The loss's log-probs, against a replay of the constraint over the raw logits.
    logps, _, out = task._logps(model, first["input_ids"], first["targets"], batch=first)
    comps = [(g["shape"], c.tokens) for g in groups for c in g["comps"]]
    expected = []
    k = 0
    for shape, tokens in comps:
        state = shape.start()
        for t in tokens:
            allowed = torch.zeros(out.logits.shape[-1], dtype=torch.bool)
            allowed[shape.allowed(state, tuple(tok.stop_ids))] = True
            expected.append(token_logps(out.logits[k:k + 1], torch.tensor([t]), temperature=1.5,
                                        allowed=allowed[None])[0])
            state = shape.advance(state, t)
            k += 1
    got = logps[first["targets"] != -100]
    assert torch.allclose(got, torch.cat(expected), atol=1e-5)
    assert answer_constraint("sentiment", {"prompt": "x"}, tok) is None  # free tasks stay free
    second, _ = next(it)
    _, metrics, _ = task.loss(model, second)
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-5)
    restored = _from_plain(cur["saved"][0])[0]
    for key in ("allowed_pairs", "constrained"):
        assert torch.equal(restored[key], first[key].view_as(restored[key]))


def test_dynamic_sampling_trains_only_on_groups_with_signal(make_chat_model) -> None:
    model, tok = _model(make_chat_model)

    def reward(prompts, completions, completion_ids, task, **kw):  # no signal at all on sentiment prompts
        return [0.0 if t == "sentiment" else sum(i % 2 == 0 for i in ids) / max(len(ids), 1)
                for t, ids in zip(task, completion_ids)]

    def first_rollout(rounds: int) -> dict:
        task = GRPOTask(model, _prompts(tok), [reward], decode=tok.decode, stop_ids=(), pad_id=tok.pad_id,
                        batch_size=2, group=4, max_new_tokens=4, seed=2, dynamic_sampling=rounds)
        return next(task.batches(0, 1, None))

    plain, cursor = first_rollout(0)
    assert cursor["position"] == 2
    assert any(g.abs().sum() == 0 for g in plain["advantages"].view(-1, 4))  # a sentiment prompt came first
    dynamic, cursor = first_rollout(4)
    groups = dynamic["advantages"].view(-1, 4)
    assert all(g.abs().sum() > 0 for g in groups)  # every group trained on carries a signal
    assert dynamic["stats"]["dynamic_draws"] >= 1 and cursor["position"] >= 2
    with pytest.raises(ValueError, match="dynamic-sampling"):
        GRPOTask(model, _prompts(tok), [reward], decode=tok.decode, stop_ids=(), pad_id=tok.pad_id,
                 dynamic_sampling=-1)


def test_a_greedy_baseline_compares_each_sample_with_the_greedy_answer(make_chat_model) -> None:
    model, tok = _model(make_chat_model)
    reward = lambda prompts, completions, completion_ids, **kw: [  # noqa: E731
        sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]
    task = GRPOTask(model, _prompts(tok), [reward], decode=tok.decode, stop_ids=(), pad_id=tok.pad_id,
                    batch_size=2, group=4, max_new_tokens=5, temperature=1.0, seed=4, baseline="greedy",
                    scale_rewards="none")
    batch, _ = next(task.batches(0, 1, None))
    prompts = [task.prompts.ids[task._prompt_at(p)] for p in range(2)]
    greedy = sample_completions(model, prompts, [0, 0], max_new_tokens=5, temperature=0.0, top_k=None,
                                top_p=None, stop_ids=(), max_batch=2)
    greedy_rewards = reward(None, None, [c.tokens for c in greedy])
    assert batch["stats"]["reward_greedy"] == pytest.approx(sum(greedy_rewards) / 2)
    # each advantage is the sample's reward minus its prompt's greedy reward (no scaling)
    completions = [row[row != -100].tolist() for row in batch["targets"]]
    expected = [r - greedy_rewards[i // 4] for i, r in enumerate(reward(None, None, completions))]
    assert batch["advantages"].tolist() == pytest.approx(expected, abs=1e-6)
    task.positive_only = True
    clipped, _ = next(task.batches(0, 1, None))
    assert clipped["advantages"].tolist() == pytest.approx([max(0.0, e) for e in expected], abs=1e-6)
    with pytest.raises(ValueError, match="--baseline"):
        GRPOTask(model, _prompts(tok), [reward], decode=tok.decode, stop_ids=(), pad_id=tok.pad_id, baseline="max")


def test_a_toy_reward_rises_within_a_few_steps(make_chat_model, tmp_path: Path) -> None:
    """Reward: the share of completion tokens with an even id. Plain GRPO on it must raise the mean reward."""
    from matelike.train import TrainConfig, Trainer

    model, tok = _model(make_chat_model)

    def even(prompts, completions, completion_ids, **kw):
        return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]

    prompts = _prompts(tok)
    task = GRPOTask(model, prompts, [even], decode=tok.decode, stop_ids=(), pad_id=tok.pad_id, batch_size=4,
                    group=8, max_new_tokens=8, seed=1)
    config = TrainConfig(out=tmp_path / "toy", max_steps=12, batch_size=4, seq_len=128, lr=3e-3, min_lr=3e-3,
                         warmup_steps=0, weight_decay=0.0, dtype="fp32", log_every=1, save_every=1000,
                         progress=False, device="cpu")
    Trainer(config, model, tok, task, export=None).fit()
    lines = [json.loads(x) for x in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in lines]
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    for key in ("reward_std", "zero_std_groups", "completion_len", "entropy", "clip_fraction", "truncated",
                "reward_sentiment", "reward_entities"):
        assert key in lines[0]


# ---- command line -------------------------------------------------------------------------------------------


def _run_args(init: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["rl", "--init", str(init), "--data", str(data), "--out", str(out), "--batch-size", "2", "--group", "3",
            "--max-new-tokens", "6", "--lr", "1e-3", "--min-lr", "1e-3", "--log-every", "1", "--dtype", "fp32",
            "--no-progress", "--device", "cpu", *extra]



def test_constrained_needs_a_byte_level_tokenizer(make_chat_model, tmp_path: Path, capsys) -> None:
    import shutil

    from matelike.cli import main

    init = tmp_path / "init"
    shutil.copytree(make_chat_model(max_seq_len=128), init)
    spec = json.loads((init / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "NFKC"}
    (init / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    data = _write_jsonl(tmp_path / "p.jsonl", TASK_RECORDS)
    assert main(_run_args(init, data, tmp_path / "out", "--max-steps", "1", "--constrained")) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: --constrained: {init / 'tokenizer.json'}: ") and "byte-level" in errors[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_bad_prompt_records_are_reported_with_file_and_line(make_chat_model, tmp_path: Path, capsys) -> None:
    from matelike.cli import main

    data = _write_jsonl(tmp_path / "p.jsonl", [
        TASK_RECORDS[0],
        {"prompt": "没有任务", "answer": "x"},
        {"prompt": "写诗", "task": "poetry", "answer": "x"},
        "{not json",
        {"prompt": "判断评论情感：好", "task": "sentiment"},
        {"prompt": "长" * 400, "task": "sentiment", "answer": "正面"},
        {"messages": [{"role": "assistant", "content": "hi"}], "task": "sentiment", "answer": "正面"},
        TASK_RECORDS[1],
    ])
    code = main(_run_args(make_chat_model(max_seq_len=128), data, tmp_path / "out", "--max-steps", "1"))
    err = capsys.readouterr().err
    assert code == 0, err
    for line, what in [(2, "missing field: 'task'"), (4, "invalid JSON"), (5, "missing field: 'answer'"),
                       (6, "prompt too long"), (7, "")]:
        assert f"{data}:{line}: {what}" in err, err
    assert f"{data}:3:" not in err  # a task without a scorer is not a bad record: it is left out, counted
    assert "2 usable, 5 bad records" in err and "left out, their task has no task reward: poetry: 1" in err
    summary = json.loads((tmp_path / "out" / "rl_data.json").read_text(encoding="utf-8"))
    assert summary["prompts"] == 2 and "entities_always_none" not in summary["reward_hack_references"]
    assert summary["left_out_by_task"] == {"poetry": 1}


EVEN_REWARD = """
def even(prompts, completions, completion_ids, **fields):
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]
"""


@pytest.mark.slow
@pytest.mark.parametrize("constrained", [(), ("--constrained",)], ids=["free", "constrained"])
def test_resume_continues_exactly(make_chat_model, tmp_path: Path, monkeypatch, constrained: tuple) -> None:
    """Interrupted between the two updates of a rollout (the cursor holds the rollout, with --constrained its
    allowed tokens too) and resumed: the same losses and rewards as the run that was not interrupted (bitwise
    in fp32 on CPU)."""
    from matelike.cli import main

    (tmp_path / "rl_test_rewards.py").write_text(EVEN_REWARD, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    init = make_chat_model(max_seq_len=128)
    data = _write_jsonl(tmp_path / "p.jsonl", TASK_RECORDS * 2)
    extra = ("--updates-per-rollout", "2", "--save-every", "1", "--beta", "0.1", "--temperature", "0.9",
             "--top-k", "100", "--reward", "task", "rl_test_rewards:even", "--reward-weights", "1", "2", *constrained)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_run_args(init, data, whole, "--max-steps", "5", *extra)) == 0
    assert main(_run_args(init, data, split, "--max-steps", "3", *extra)) == 0
    assert main(_run_args(init, data, split, "--max-steps", "5", "--resume", *extra)) == 0
    a, b = _metrics(whole), _metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "reward", "kl", "entropy", "ratio"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    assert a[0]["ratio"] == 1.0 and a[1]["ratio"] != 1.0  # the second update of a rollout sees the ratio
    assert "reward_fn_task" in a[0] and "reward_fn_even" in a[0]


@pytest.mark.slow
def test_two_processes_end_with_identical_weights_and_match_one_process(make_chat_model, tmp_path: Path) -> None:
    """gloo DDP, one prompt per rank against one process with both prompts: same rewards and losses, and both
    ranks end with the same weights (the loss goes through the wrapped module, so gradients are averaged)."""
    import os
    import subprocess
    import sys

    init = make_chat_model(max_seq_len=128)
    data = _write_jsonl(tmp_path / "p.jsonl", TASK_RECORDS)
    script = str(Path(__file__).with_name("ddp_rl.py"))
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher_vars}, "OMP_NUM_THREADS": "1"}

    def run(nproc: int, batch: int, out: Path, rounds: int = 0) -> list[dict]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, "grpo",
               str(init), str(data), str(out), str(batch), "3", str(rounds)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _metrics(out)

    one, two = run(1, 2, tmp_path / "one"), run(2, 1, tmp_path / "two")
    w0, w1 = torch.load(tmp_path / "two" / "rank-0.pt"), torch.load(tmp_path / "two" / "rank-1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    single = torch.load(tmp_path / "one" / "rank-0.pt")
    # float reduction order differs between one and two processes; Adam's normalised steps carry it to ~1e-5
    assert all(torch.allclose(w0[k], single[k], atol=1e-4) for k in w0)
    for key in ("reward", "reward_std", "loss"):
        assert [m[key] for m in one] == pytest.approx([m[key] for m in two], abs=1e-5), key
    # dynamic sampling: ranks may draw different numbers of prompts, and still agree on every step
    dyn = run(2, 1, tmp_path / "dynamic", rounds=3)
    w0, w1 = torch.load(tmp_path / "dynamic" / "rank-0.pt"), torch.load(tmp_path / "dynamic" / "rank-1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0) and len(dyn) == 3 and "dynamic_draws" in dyn[0]


def test_a_packed_prompts_file_gives_the_same_prompts(tokenizer, tokenizer_dir, tmp_path: Path, capsys) -> None:
    from matelike.data.packed import pack_chat
    from matelike.data.records import BadRecordReport, DataFileError
    from matelike.rl.rewards import check_task_record
    from matelike.rl.rollout import load_prompts

    records = TASK_RECORDS + [{"prompt": "没有任务", "answer": "x"}]
    raw = _write_jsonl(tmp_path / "p.jsonl", records)
    packed = tmp_path / "p.bin"
    pack_chat(tokenizer_dir, [raw], packed, "prompts", seq_len=None, progress=False)
    a = load_prompts([str(raw)], tokenizer, 100, BadRecordReport(), check_task_record)
    report = BadRecordReport()
    b = load_prompts([str(packed)], tokenizer, 100, report, check_task_record)
    assert a.ids == b.ids and a.fields == b.fields and len(b) == 4
    assert f"{packed}:5: missing field: 'task'" in capsys.readouterr().err and report.total == 1
    assert "判断评论情感" in b.prompts[0]  # rewards get the rendered prompt's text
    with pytest.raises(DataFileError, match="only --data file"):
        load_prompts([str(packed), str(raw)], tokenizer, 100, BadRecordReport())


def test_bad_flags_stop_before_training(make_chat_model, tmp_path: Path, capsys) -> None:
    from matelike.cli import main

    init = make_chat_model(max_seq_len=128)
    data = _write_jsonl(tmp_path / "p.jsonl", TASK_RECORDS)
    for extra, msg in [(("--reward", "nope"), "expected `task` or `module:function`"),
                       (("--reward", "task", "--reward-weights", "1", "2"), "1 --reward but 2 --reward-weights"),
                       (("--fsdp",), "without --fsdp"), (("--group", "1"), "--group must be >= 2"),
                       (("--top-k", "0"), "top_k must be an integer >= 1"),
                       (("--max-new-tokens", "128"), "--max-new-tokens must be between 1 and"),
                       (("--algo", "ppo", "--reward", "task", "--baseline", "greedy"), "--baseline and"),
                       (("--algo", "ppo", "--reward", "task", "--positive-only"), "--baseline and")]:
        assert main(_run_args(init, data, tmp_path / "out", "--max-steps", "1", *extra)) == 2, extra
        assert msg in capsys.readouterr().err, extra
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_rollouts_of_prompts_of_different_lengths_under_bf16_autocast(make_chat_model) -> None:
    """`--dtype auto` trains under bf16 autocast on a CPU that supports it: sampling must still work (the KV
    cache holds the fp32 weights' dtype) and the scoring forwards run under the same autocast."""
    model, tok = _model(make_chat_model)
    task = GRPOTask(model, _prompts(tok), [lambda p, c, **kw: [float(len(x)) for x in c]], decode=tok.decode,
                    stop_ids=tok.stop_ids, pad_id=tok.pad_id, batch_size=4, group=4, max_new_tokens=6, seed=0,
                    updates_per_rollout=2, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    batch, _ = next(task.batches(0, 1, None))
    assert len({len(p) for p in _prompts(tok).ids}) > 1 and batch["old_logps"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics, n = task.loss(model, batch)
    assert n > 0 and torch.isfinite(loss) and metrics["ratio"] == 1.0

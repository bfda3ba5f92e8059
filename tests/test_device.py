"""matelike.device: one resolver for --device/--dtype, and every command spelling them the same way."""

from __future__ import annotations

import argparse

import pytest
import torch

from matelike.cli import build_parser
from matelike.device import (DEVICE_HELP, DTYPES, QUANTIZE, cpu_bf16_is_faster, resolve_device, training_dtype,
                             weights_dtype)

CPU = torch.device("cpu")


def test_training_dtype_auto_follows_the_cpu() -> None:
    assert training_dtype("fp32", CPU) == "fp32"
    assert training_dtype("bf16", CPU) == "bf16"
    assert training_dtype("auto", CPU) == ("bf16" if cpu_bf16_is_faster() else "fp32")
    with pytest.raises(ValueError, match="GPU"):
        training_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="float32"):
        training_dtype("float32", CPU)  # the old spelling of generate is gone: one vocabulary


def test_weights_dtype_is_the_training_choice_as_a_torch_dtype() -> None:
    assert weights_dtype("fp32", CPU) == torch.float32
    assert weights_dtype("bf16", CPU) == torch.bfloat16
    assert weights_dtype("auto", CPU) == (torch.bfloat16 if cpu_bf16_is_faster() else torch.float32)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else CPU)
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            resolve_device("cuda")


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    """Every leaf command's parser, by its words (`data check`, `generate`, ...)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, (*prefix, name)))
    if not found and prefix:
        found[" ".join(prefix)] = parser
    return found


# Commands that run a model, and so must take --device and --dtype (`bench generate` times the CPU decode
# path against transformers' and takes --dtype only).
MODEL_COMMANDS = {"pretrain", "sft", "dpo", "dpo-make-pairs", "generate", "chat", "serve", "eval", "bench serve",
                  "bench train", "rl", "bench rl", "reward train"}
# Of those, the ones that only run a model (no training) also take --quantize; training never sees int8 weights.
INFERENCE_COMMANDS = {"dpo-make-pairs", "generate", "chat", "serve", "eval", "bench serve"}
# Of those, the ones that stream answers to a user can compile their decode steps.
COMPILE_DECODE = {"generate", "chat", "serve", "bench serve"}


def test_every_command_that_runs_a_model_takes_the_same_device_and_dtype_flags(capsys) -> None:
    commands = _commands(build_parser())
    assert MODEL_COMMANDS <= commands.keys()
    for name in MODEL_COMMANDS:
        parser = commands[name]
        flags = {opt: a for a in parser._actions for opt in a.option_strings}
        assert flags["--device"].default == "auto", name
        assert flags["--device"].help == DEVICE_HELP, name
        if name != "bench train":  # it times every dtype of --dtypes side by side
            assert flags["--dtype"].default == "auto", name
            assert tuple(flags["--dtype"].choices) == DTYPES, name
        if name in INFERENCE_COMMANDS:
            assert flags["--quantize"].default == "none" and tuple(flags["--quantize"].choices) == QUANTIZE, name
        else:
            assert "--quantize" not in flags, name
        if name in COMPILE_DECODE:
            assert flags["--compile"].default is False and "decode steps" in flags["--compile"].help, name
        parser.print_help()
        assert "--device" in capsys.readouterr().out


def test_every_command_has_help(capsys) -> None:
    commands = _commands(build_parser())
    assert commands["bench generate"]._option_string_actions["--dtype"].choices == DTYPES
    for name, parser in commands.items():
        parser.print_help()
        assert capsys.readouterr().out.startswith("usage: "), name

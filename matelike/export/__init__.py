"""Exports of a model directory to other runtimes' formats: `gguf.py` (`matelike export gguf`, for llama.cpp
and Ollama).

Nothing is imported here, so `matelike --help` never loads torch or gguf.
"""

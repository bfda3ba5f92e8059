"""The model: `transformer.py` (the whole network, KV cache included), `io.py` (Hugging Face model
directories), `generation.py` (sampling with the KV cache) and `info.py` (`matelike model info`).

Nothing is imported here, so `matelike --help` and the data commands never load torch.
"""

"""Data: record readers (`records.py`), layouts (`formats.py`), `matelike data check|pack|demo`, and the
SFT and preference datasets the training stages read (`sft.py`, `preference.py`)."""

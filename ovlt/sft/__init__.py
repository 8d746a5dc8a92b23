"""Supervised fine-tuning: `data` (the dataset and the resumable stream of packed
micro-batches), `train` (the loss and `run_sft`, the loop behind `launchers/sft.py`)."""

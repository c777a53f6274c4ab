"""The ``mmlu_accuracy`` evaluate module; see ``mmlu_accuracy.py``."""

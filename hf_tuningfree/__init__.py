"""hf_tuningfree: tuning-free optimizers for Hugging Face training.

``hf_tuningfree.optim`` needs only torch. The Hugging Face integration is imported lazily so that
``import hf_tuningfree`` stays cheap and works without transformers installed.
"""

from __future__ import annotations

__version__ = "0.1.0"

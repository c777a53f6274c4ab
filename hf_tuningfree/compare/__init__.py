"""``hf-tuningfree compare``: did the untuned optimizer match a tuned baseline?

- :mod:`.spec`: what a comparison runs (:class:`TaskSpec`, :class:`RunSpec`, the AdamW grid);
- :mod:`.tasks`: turning a task into a tokenizer, data and a model factory;
- :mod:`.runner`: runs in worker processes, cached on disk, resumable, interruptible;
- :mod:`.results`: runs aggregated over seeds and the verdict; :mod:`.report` writes the files,
  :mod:`.plots` the pictures;
- :mod:`.cli`: the command line (``hf-tuningfree compare``, ``python -m hf_tuningfree.compare``).
"""

from hf_tuningfree.compare.cli import main, run
from hf_tuningfree.compare.spec import RunSpec, TaskSpec, build_runs, log_grid

__all__ = ["RunSpec", "TaskSpec", "build_runs", "log_grid", "main", "run"]

"""litvision's GPU check, run in one call by bench/gpu_check.sh (docs/benchmarks.md, "GPU check").

* ``plan``: the scales (full, quick, dry run), the checks and their ``train.py`` command lines;
* ``orchestrate`` (``python -m bench.gpu_check``): each check in its own process with its own timeout, within
  a wall-clock budget;
* ``checks``: one check's process: its commands, then the verification of what they wrote;
* ``speed``: the callback that times ``fit`` against a raw ``torch.autocast`` loop on the same model;
* ``summary``: the table, ``summary.json`` and ``summary.md``.
"""

"""``rollstream eval``: pass@k of policy versions (or of the tasks' reference solutions) on a task
set, outside the training streams; every attempt lands in the lake table ``evals``.

Modules: ``settings`` (``[eval]``), ``passk`` (the unbiased estimator and its interval), ``policy``
(``latest`` / ``v<N>`` / a directory -> a checkpoint), ``sandboxes`` (the evaluator's own
sandboxd), ``runner`` (attempts through the agent loop and the verifier), ``evaluate`` (one or
several policies over a task set, into the lake), ``summary`` (tables), ``worker`` (``--every N``:
evaluate versions as the learner publishes them), ``cli`` (the commands). See docs/tasks.md.
"""

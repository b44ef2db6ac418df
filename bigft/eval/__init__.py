"""Evaluation: the numbers, scoring a split, and the two places that ask for it.

- `bigft.eval.metrics`: the numbers from a model and batches or examples: loss per
  target token and perplexity, exact match by greedy generation, classification and
  regression metrics, a user's scorer (eval.scorer).
- `bigft.eval.split`: scoring one split of prepared data on every process at once
  (eval batches, generation examples), logged and printed; shared by the two below.
- `bigft.eval.during_training`: evaluation inside a training run: the evaluation at
  the run's step, the best checkpoint, early stopping, loading the best weights back.
- `bigft.eval.standalone`: the `bigft eval` command's library side: which config scores
  which model (a run directory, an exported model or adapter) on which rows.

Import the modules by their full names (`from bigft.eval.metrics import ...`); nothing is
re-exported here.
"""

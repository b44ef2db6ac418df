"""Task metrics for classification and regression, computed with scikit-learn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, AUC-ROC and the confusion matrix (rows: true, columns: predicted).

    AUC is one-vs-rest macro for more than two classes; it is left out (None) when the
    labels hold a single class, where it is undefined.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    classes = list(range(len(names)))
    preds = logits.argmax(axis=-1)
    probs = softmax(logits.astype(np.float64))
    present = np.unique(labels)
    auc: float | None = None
    if len(present) == len(classes):
        if len(classes) == 2:
            auc = float(roc_auc_score(labels, probs[:, 1]))
        else:
            auc = float(roc_auc_score(labels, probs, multi_class="ovr", labels=classes))
    return {
        "eval_accuracy": float(accuracy_score(labels, preds)),
        "eval_f1_macro": float(
            f1_score(labels, preds, labels=classes, average="macro", zero_division=0)
        ),
        "eval_auc": auc,
        "eval_examples": len(labels),
        "confusion_matrix": confusion_matrix(labels, preds, labels=classes).tolist(),
        "label_names": list(names),
    }


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Mean squared / absolute error and R^2 of scalar predictions."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    predictions = predictions.reshape(-1)
    return {
        "eval_mse": float(mean_squared_error(targets, predictions)),
        "eval_mae": float(mean_absolute_error(targets, predictions)),
        "eval_r2": float(r2_score(targets, predictions)) if len(targets) > 1 else None,
        "eval_examples": len(targets),
    }

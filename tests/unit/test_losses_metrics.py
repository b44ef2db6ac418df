"""Loss sums for every task, distillation, and classification / regression metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigft.eval.metrics import classification_metrics, regression_metrics
from bigft.losses import count_targets, distill_loss_sum, task_loss_sum


def test_count_targets_per_task() -> None:
    tokens = torch.tensor([[-100, 3, 4, -100], [-100, -100, 5, 6]])
    assert count_targets({"labels": tokens}) == 4  # shifted: positions 1..3
    assert count_targets({"labels": torch.tensor([1, -100, 0])}) == 2
    assert count_targets({"labels": torch.tensor([0.5, float("nan"), 1.0])}) == 2


def test_regression_loss_ignores_filler_rows_without_nan_gradients() -> None:
    logits = torch.tensor([[1.0], [5.0], [2.0]], requires_grad=True)
    loss = task_loss_sum(logits, torch.tensor([0.0, float("nan"), 4.0]))
    loss.backward()
    assert loss.item() == pytest.approx(1.0 + 4.0)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[1].item() == 0.0


def test_distillation_kl_matches_definition() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([1, 2, -100, 0])
    t = 3.0
    expected = (
        sum(
            F.kl_div(
                F.log_softmax(student[i] / t, -1),
                F.log_softmax(teacher[i] / t, -1),
                log_target=True,
                reduction="sum",
            )
            for i in (0, 1, 3)
        )
        * t**2
    )
    got = distill_loss_sum(student, teacher, labels, t)
    assert got.item() == pytest.approx(float(expected), rel=1e-5)
    assert distill_loss_sum(teacher, teacher, labels, t).item() == pytest.approx(0.0, abs=1e-6)


def test_classification_metrics_by_hand() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.0]])
    labels = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(logits, labels, ["neg", "pos"])
    assert m["eval_accuracy"] == pytest.approx(4 / 5)
    assert m["confusion_matrix"] == [[2, 0], [1, 2]]
    f1_neg, f1_pos = 2 * 2 / (2 * 2 + 1), 2 * 2 / (2 * 2 + 1)
    assert m["eval_f1_macro"] == pytest.approx((f1_neg + f1_pos) / 2)
    # positive-class scores rank: all positives above all negatives except one pair
    assert m["eval_auc"] == pytest.approx(5 / 6)


def test_auc_undefined_with_one_class_and_multiclass_ovr() -> None:
    one = classification_metrics(np.zeros((3, 2)), np.array([1, 1, 1]), ["a", "b"])
    assert one["eval_auc"] is None
    logits = np.eye(3)[[0, 1, 2, 0]] * 4
    three = classification_metrics(logits, np.array([0, 1, 2, 0]), ["a", "b", "c"])
    assert three["eval_auc"] == pytest.approx(1.0) and three["eval_accuracy"] == 1.0


def test_regression_metrics() -> None:
    m = regression_metrics(np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 3.0, 3.0]))
    assert m["eval_mse"] == pytest.approx(2 / 3)
    assert m["eval_mae"] == pytest.approx(2 / 3)
    assert math.isfinite(m["eval_r2"])

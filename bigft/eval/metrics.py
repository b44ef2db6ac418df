"""The numbers an evaluation reports, from a model and batches or examples.

Causal LM: loss per target token and perplexity (`evaluate_loss`, through the training
loss `bigft.losses.loss_sum`), exact match of greedy answers (`exact_match`).
Classification / regression: accuracy, macro-F1, AUC-ROC and the confusion matrix, or
MSE / MAE / R^2, computed with scikit-learn (`evaluate_labeled`). A user's own metrics:
`load_scorer` (eval.scorer).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from bigft.losses import logits_and_labels, loss_sum, target_mask, task_loss_sum


@torch.no_grad()
def evaluate_loss(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], accelerator: Accelerator
) -> dict[str, float]:
    """Mean loss per target token over all processes, and its perplexity."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss, tokens = loss_sum(model, batch)
        total += torch.stack([loss.double(), tokens.double()])
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    summed, tokens = total.tolist()
    mean = summed / max(tokens, 1.0)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": int(tokens)}


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Greedy completions for token-id prompts (left-padded batches)."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, prompt in enumerate(chunk):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return outputs


def normalize_answer(text: str) -> str:
    """Exact match compares answers with surrounding whitespace removed."""
    return " ".join(text.split())


def exact_match(
    model: Any,
    tokenizer: Any,
    examples: Sequence[tuple[Sequence[int], str]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Share of (prompt ids, reference) examples whose greedy answer equals the reference."""
    prompts = [p for p, _ in examples]
    predictions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, device)
    hits = [
        normalize_answer(pred) == normalize_answer(ref)
        for pred, (_, ref) in zip(predictions, examples, strict=True)
    ]
    samples = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": r, "prediction": y}
        for (p, r), y in zip(examples, predictions, strict=True)
    ]
    return {"exact_match": sum(hits) / max(len(hits), 1), "samples": samples}


@torch.no_grad()
def evaluate_labeled(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    accelerator: Accelerator,
    label_names: Sequence[str] | None,
) -> dict[str, Any]:
    """Classification (label_names given) or regression metrics over all processes.

    Every process keeps its logits and labels; they are gathered once at the end, and
    filler rows (label -100 / NaN, see the eval loader) are dropped before scoring.
    """
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    local: list[tuple[np.ndarray, np.ndarray]] = []
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        logits, labels = logits_and_labels(model, batch)
        keep = target_mask(labels)
        local.append((logits[keep].float().cpu().numpy(), labels[keep].cpu().numpy()))
    model.train(was_training)
    pairs = gather_object(local) if accelerator.num_processes > 1 else local
    if not pairs or sum(len(y) for _, y in pairs) == 0:
        return {}
    logits_np = np.concatenate([x for x, _ in pairs])
    labels_np = np.concatenate([y for _, y in pairs])
    loss = task_loss_sum(torch.from_numpy(logits_np), torch.from_numpy(labels_np)).item()
    mean = loss / len(labels_np)
    if label_names is None:
        return {"eval_loss": mean, **regression_metrics(logits_np, labels_np)}
    return {"eval_loss": mean, **classification_metrics(logits_np, labels_np, label_names)}


@torch.no_grad()
def evaluate_contrastive(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], accelerator: Accelerator
) -> dict[str, Any]:
    """Task contrastive over all processes: the InfoNCE of the whole split as one batch,
    image->text and text->image recall@1/@5 (identical captions count as one), and
    zero-shot accuracy over the class prompts the batches carry
    (`bigft.contrastive.metrics_of`)."""
    from accelerate.utils import gather_object

    from bigft.contrastive import embed, logit_scale, metrics_of

    was_training = model.training
    model.eval()
    local: list[tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]] = []
    prompts: torch.Tensor | None = None
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        images, texts = embed(model, batch)
        rows = batch["labels"].shape[0]
        keep = batch["labels"] != -100  # filler rows of a short process
        if prompts is None and texts.shape[0] > rows:
            prompts = texts[rows:].cpu()
        keys = batch["caption_ids"][keep].tolist()
        local.append(
            (images[keep].cpu(), texts[:rows][keep].cpu(), keys, batch["labels"][keep].cpu())
        )
    model.train(was_training)
    scale = float(logit_scale(accelerator.unwrap_model(model)))
    parts = gather_object(local) if accelerator.num_processes > 1 else local
    if not parts or sum(len(k) for _, _, k, _ in parts) == 0:
        return {}
    images = torch.cat([p[0] for p in parts])
    texts = torch.cat([p[1] for p in parts])
    captions = [str(k) for p in parts for k in p[2]]
    labels = torch.cat([p[3] for p in parts])
    result = metrics_of(images, texts, captions, scale, prompts, labels)
    return {**result, "eval_examples": len(captions), "temperature": 1.0 / scale}


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


def load_scorer(spec: str) -> Callable[..., Any]:
    """The custom scorer named 'module:function' (eval.scorer), checked to be a function
    that can be called as `function(predictions, references)`."""
    import importlib
    import inspect

    from bigft.errors import ConfigError

    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name.isidentifier():
        raise ConfigError(f"eval.scorer '{spec}': write it as 'module:function'")
    # A scorer module beside the user's config is found in the working directory, which
    # launched workers keep off the front of sys.path (PYTHONSAFEPATH): appended last, it
    # can never shadow an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"eval.scorer: cannot import '{module_name}' ({exc})") from None
    except Exception as exc:  # the module's own code failed (a SyntaxError, a NameError...)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ConfigError(f"eval.scorer: importing '{module_name}' failed: {reason}") from None
    scorer = getattr(module, func_name, None)
    if not callable(scorer):
        raise ConfigError(f"eval.scorer: '{module_name}' has no function '{func_name}'")
    if inspect.isclass(scorer):
        # Calling a class makes an instance, not the dict of metrics a scorer returns.
        raise ConfigError(f"eval.scorer: '{spec}' is a class; name a function")
    try:
        signature = inspect.signature(scorer)
    except (TypeError, ValueError):
        return scorer  # a builtin without a readable signature: it is found at first use
    try:
        signature.bind(["prediction"], ["reference"])
    except TypeError as exc:
        raise ConfigError(
            f"eval.scorer: '{spec}' cannot be called as {func_name}(predictions, references): {exc}"
        ) from None
    return scorer

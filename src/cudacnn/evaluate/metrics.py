"""Classification metrics: accuracy, loss, confusion matrix, per-class precision/recall/F1 and the most
confused class pairs. The pure functions work on NumPy arrays; `evaluate` runs a model over a loader."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


def confusion_matrix(preds, targets, k: int) -> np.ndarray:
    """(k, k) int64 counts; rows are true classes, columns predicted ones."""
    preds, targets = np.asarray(preds, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    if preds.shape != targets.shape:
        raise ValueError(f"{preds.shape} predictions but {targets.shape} targets")
    return np.bincount(targets * k + preds, minlength=k * k).reshape(k, k).astype(np.int64)


def per_class_metrics(cm: np.ndarray, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class; 0.0 where a ratio's denominator is 0."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted, support = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)]


def most_confused(cm: np.ndarray, classes: list[str], top: int = 5) -> list[dict]:
    """The `top` largest off-diagonal cells: true class, predicted class, count, fraction of that class."""
    off = np.asarray(cm, dtype=np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = []
    for flat in order:
        t, p = divmod(int(flat), off.shape[1])
        if off[t, p] == 0:
            break
        support = max(int(cm[t].sum()), 1)
        pairs.append({"true": classes[t], "predicted": classes[p], "count": int(off[t, p]),
                      "fraction": off[t, p] / support})
    return pairs


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    confusion: np.ndarray
    classes: list[str]
    per_class: list[dict] = field(default_factory=list)
    most_confused: list[dict] = field(default_factory=list)
    tta_level: int = 0

    @classmethod
    def from_confusion(cls, cm: np.ndarray, loss: float, classes: list[str], tta_level: int = 0) -> "EvalResult":
        total = max(int(cm.sum()), 1)
        return cls(accuracy=float(np.trace(cm)) / total, loss=loss, confusion=cm, classes=list(classes),
                   per_class=per_class_metrics(cm, classes), most_confused=most_confused(cm, classes),
                   tta_level=tta_level)

    @property
    def num_samples(self) -> int:
        return int(self.confusion.sum())

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "loss": self.loss, "num_samples": self.num_samples,
                "tta_level": self.tta_level, "classes": self.classes, "confusion": self.confusion.tolist(),
                "per_class": self.per_class, "most_confused": self.most_confused}

    @classmethod
    def from_dict(cls, data: dict) -> "EvalResult":
        cm = np.asarray(data["confusion"], dtype=np.int64)
        return cls.from_confusion(cm, data["loss"], data["classes"], data.get("tta_level", 0))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device=None, tta_level: int = 0,
             classes: list[str] | None = None) -> EvalResult:
    """Run `model` over `loader`'s (images, labels) batches. Images are cast to the model's parameter dtype
    and device; the model is put in eval mode and restored afterwards."""
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} classes")
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for images, labels in loader:
            images = images.to(device, param.dtype, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if tta_level:
                from cudacnn.evaluate.tta import predict_tta

                logits = predict_tta(model, images, level=tta_level)
            else:
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            cm += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes ** 2)
    finally:
        model.train(was_training)
    cm_np = cm.view(num_classes, num_classes).cpu().numpy()
    n = max(int(cm_np.sum()), 1)
    return EvalResult.from_confusion(cm_np, float(loss_sum) / n, classes, tta_level)

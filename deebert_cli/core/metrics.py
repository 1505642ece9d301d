"""Classification metrics without extra dependencies."""
from __future__ import annotations


def accuracy(preds, labels) -> float:
    """Fraction of equal entries of two equally long sequences (or 1-D tensors)."""
    preds, labels = list(map(int, preds)), list(map(int, labels))
    return sum(p == y for p, y in zip(preds, labels)) / max(1, len(labels))


def macro_f1(preds, labels, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over classes present in labels or predictions."""
    preds, labels = list(map(int, preds)), list(map(int, labels))
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(1, len(f1s))

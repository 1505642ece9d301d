"""Classification and regression metrics without extra dependencies (no scipy)."""
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


# ------------------------------------------------------------------------------------------------
# regression
# ------------------------------------------------------------------------------------------------
def mse(preds, targets) -> float:
    """Mean squared error of two equally long sequences of numbers."""
    preds, targets = list(map(float, preds)), list(map(float, targets))
    return sum((p - y) ** 2 for p, y in zip(preds, targets)) / max(1, len(targets))


def pearson(a, b) -> float:
    """Pearson correlation; nan when either side is constant."""
    a, b = list(map(float, a)), list(map(float, b))
    n = len(a)
    if n < 2:
        return float("nan")
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else float("nan")


def ranks(values) -> list:
    """1-based ranks, ties given the mean of the ranks they span (as Spearman needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson on tie-averaged ranks)."""
    return pearson(ranks(list(map(float, a))), ranks(list(map(float, b))))


def regression_report(preds, targets) -> dict:
    """{"mse", "pearson", "spearman"} of predictions vs targets."""
    return {"mse": mse(preds, targets), "pearson": pearson(preds, targets), "spearman": spearman(preds, targets)}

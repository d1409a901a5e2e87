"""Classification metrics (scikit-learn): accuracy, macro-F1, per-class recall, one-vs-rest AUC and the confusion
matrix of labels and class probabilities."""
from __future__ import annotations


def classification_metrics(y, probs, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class recall, macro one-vs-rest AUC and the confusion matrix (scikit-learn) of
    labels y and class probabilities (n, C); predictions are the argmax. The AUC averages the classes that have
    positives and negatives among y (sklearn's macro OvR when every class is present)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score

    y, probs = np.asarray(y, dtype=int), np.asarray(probs, dtype=np.float64)
    labels = list(range(len(classes)))
    pred = probs.argmax(axis=1)
    present = [c for c in labels if 0 < int((y == c).sum()) < len(y)]
    if len(present) == len(labels):
        auc = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels))
    elif present:
        auc = float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    else:
        auc = None
    recall = recall_score(y, pred, labels=labels, average=None, zero_division=0)
    return {"n": int(len(y)), "accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
            "per_class_recall": {c: float(r) for c, r in zip(classes, recall)},
            "macro_auc_ovr": auc, "auc_classes": [classes[c] for c in present],
            "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist()}

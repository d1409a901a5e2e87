"""Metrics by kind: text (BLEU / METEOR / ROUGE-L / CIDEr of reports and captions), clinical (precision / recall /
F1 of disease calls, CheXbert clinical efficacy), classification (accuracy, F1, AUC, confusion matrix) and embedding
(cosine / MSE agreement of a student with its teacher). Each module imports its heavy libraries when called."""
from core.metrics.classification import classification_metrics  # noqa: F401
from core.metrics.clinical import chexbert_scores, clinical_prf  # noqa: F401
from core.metrics.embedding import AGREEMENT, cosine, embedding_agreement, mse  # noqa: F401
from core.metrics.text import report_metrics  # noqa: F401

"""Report metrics: BLEU-1..4, METEOR and ROUGE-L from pycocoevalcap (the standard captioning scorer, run offline with
Java), and clinical precision / recall / F1 of the 14 disease calls (scikit-learn)."""
from __future__ import annotations

import shutil


def report_metrics(references: dict[str, str], predictions: dict[str, str], cider: bool = False) -> dict[str, float]:
    """Corpus-level scores over all cases in one call (METEOR starts a JVM: score a whole test set at once);
    texts are PTB-tokenised first, as the COCO caption evaluation does. `cider` adds CIDEr (COCO's CIDEr-D)."""
    if shutil.which("java") is None:
        raise RuntimeError("pycocoevalcap needs Java for METEOR and its tokenizer: apt-get install default-jre-headless "
                           "(launchers/setup.sh does this when java is missing)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = sorted(references)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": references[i]}] for i in ids})
    res = tok.tokenize({i: [{"caption": predictions.get(i, "") or "empty"}] for i in ids})
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)})
    meteor = Meteor()
    out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    del meteor  # its __del__ stops the JVM
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if cider:
        from pycocoevalcap.cider.cider import Cider

        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def clinical_prf(truth: list[list[int]], predicted: list[list[int]], names: list[str]) -> dict:
    """Micro and macro precision / recall / F1 of binary disease calls, and per-disease F1."""
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support

    y, p = np.asarray(truth), np.asarray(predicted)
    out = {}
    for avg in ("micro", "macro"):
        pr, rc, f1, _ = precision_recall_fscore_support(y, p, average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(pr), f"{avg}_recall": float(rc), f"{avg}_f1": float(f1)})
    _, _, f1s, support = precision_recall_fscore_support(y, p, average=None, zero_division=0)
    out["per_disease_f1"] = {n: float(f) for n, f, s in zip(names, f1s, support)}
    return out

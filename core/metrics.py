"""Report metrics: BLEU-1..4, METEOR and ROUGE-L (and CIDEr) from pycocoevalcap (the standard captioning scorer, run
offline with Java); clinical precision / recall / F1 of binary disease calls (scikit-learn); and the CheXbert
clinical-efficacy scores exactly as Dia-LLaMA computes them (utils/metrics_clinical.py, utils/metrics_nlg.py).

Two ways to feed the captioning scorers: `tokenize="ptb"` (the COCO caption evaluation: PTBTokenizer lower-cases,
splits punctuation off and drops it; BLIP's default) and `tokenize="raw"` (Dia-LLaMA's utils/metrics_nlg.py: the
report strings as they are, one hypothesis and one reference per case; Dia-Pangu's default, the paper's numbers).
"""
from __future__ import annotations

import shutil
from typing import Literal


def report_metrics(references: dict[str, str], predictions: dict[str, str], cider: bool = False,
                   tokenize: Literal["ptb", "raw"] = "ptb") -> dict[str, float]:
    """Corpus-level scores over all cases in one call (METEOR starts a JVM: score a whole test set at once).
    `tokenize`: "ptb" PTB-tokenises both sides first (an empty prediction becomes "empty"); "raw" scores the strings
    as Dia-LLaMA does (cases in the order of `references`; line breaks become spaces for METEOR only, whose one-line
    protocol they would break). `cider` adds CIDEr (COCO's CIDEr-D)."""
    if tokenize not in ("ptb", "raw"):
        raise ValueError(f"tokenize must be 'ptb' or 'raw', not {tokenize!r}")
    if shutil.which("java") is None:
        raise RuntimeError("pycocoevalcap needs Java for METEOR and its tokenizer: apt-get install default-jre-headless "
                           "(launchers/setup.sh does this when java is missing)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    if tokenize == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ids = sorted(references)
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": references[i]}] for i in ids})
        res = tok.tokenize({i: [{"caption": predictions.get(i, "") or "empty"}] for i in ids})
        meteor_gts, meteor_res = gts, res
    else:
        ids = list(references)
        gts = {i: [str(references[i])] for i in ids}
        res = {i: [str(predictions.get(i, ""))] for i in ids}

        def one_line(d):
            return {i: [" ".join(t.splitlines())] for i, (t,) in d.items()}

        meteor_gts, meteor_res = one_line(gts), one_line(res)
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)})
    meteor = Meteor()
    out["METEOR"] = float(meteor.compute_score(meteor_gts, meteor_res)[0])
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


def chexbert_scores(truth_codes: list[list[int]], predicted_codes: list[list[int]], names: list[str]) -> dict:
    """Dia-LLaMA's clinical efficacy (utils/metrics_clinical.py): CheXbert codes of the reference and the generated
    reports, positive where the code is 1; per-disease and micro precision / recall / F1 with its 1e-6 in the
    denominators, macro = the mean over the 14 diseases, example-based ones per report; plus AUC as its
    utils/metrics_nlg.compute_mlc defines it (roc_auc_score of the binary calls per disease, macro = the mean over
    the diseases whose reference calls have both classes, those without listed; micro over all calls together)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    gts = np.asarray(truth_codes) == 1
    res = np.asarray(predicted_codes) == 1
    tp = (res & gts).astype(float)
    fp = (res & ~gts).astype(float)
    fn = (~res & gts).astype(float)
    tp_c, fp_c, fn_c = tp.sum(0), fp.sum(0), fn.sum(0)
    tp_e, fp_e, fn_e = tp.sum(1), fp.sum(1), fn.sum(1)
    p_c = np.nan_to_num(tp_c / (tp_c + fp_c + 1e-6))
    r_c = np.nan_to_num(tp_c / (tp_c + fn_c + 1e-6))
    f1_c = np.nan_to_num(tp_c / (tp_c + 0.5 * (fp_c + fn_c) + 1e-6))
    out = {
        "ce_precision_macro": float(p_c.mean()), "ce_recall_macro": float(r_c.mean()), "ce_f1_macro": float(f1_c.mean()),
        "ce_precision_micro": float(tp_c.sum() / (tp_c.sum() + fp_c.sum() + 1e-6)),
        "ce_recall_micro": float(tp_c.sum() / (tp_c.sum() + fn_c.sum() + 1e-6)),
        "ce_f1_micro": float(tp_c.sum() / (tp_c.sum() + 0.5 * (fp_c.sum() + fn_c.sum()) + 1e-6)),
        "ce_precision_example": float(np.nan_to_num(tp_e / (tp_e + fp_e + 1e-6)).mean()),
        "ce_recall_example": float(np.nan_to_num(tp_e / (tp_e + fn_e + 1e-6)).mean()),
        "ce_f1_example": float(np.nan_to_num(tp_e / (tp_e + 0.5 * (fp_e + fn_e) + 1e-6)).mean()),
        "ce_num_examples": float(len(res)),
    }
    aucs, undefined = {}, []
    for i, name in enumerate(names):
        if len(set(gts[:, i].tolist())) < 2:
            undefined.append(name)
        else:
            aucs[name] = float(roc_auc_score(gts[:, i], res[:, i]))
    out["ce_auc_macro"] = float(np.mean(list(aucs.values()))) if aucs else None
    flat = gts.reshape(-1)
    out["ce_auc_micro"] = float(roc_auc_score(flat, res.reshape(-1))) if len(set(flat.tolist())) == 2 else None
    out["ce_per_disease_f1"] = {n: float(f) for n, f in zip(names, f1_c)}
    out["ce_per_disease_auc"] = aucs
    out["ce_auc_undefined"] = undefined
    return out

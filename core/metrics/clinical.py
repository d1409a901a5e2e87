"""Clinical metrics of disease calls: precision / recall / F1 of binary calls (scikit-learn), and the CheXbert
clinical-efficacy scores exactly as Dia-LLaMA computes them (utils/metrics_clinical.py, utils/metrics_nlg.py)."""
from __future__ import annotations


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

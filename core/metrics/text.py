"""Report-text metrics: BLEU-1..4, METEOR and ROUGE-L (and CIDEr) from pycocoevalcap (the standard captioning
scorer, run offline with Java).

Two ways to feed the scorers: `tokenize="ptb"` (the COCO caption evaluation: PTBTokenizer lower-cases, splits
punctuation off and drops it; BLIP's default) and `tokenize="raw"` (Dia-LLaMA's utils/metrics_nlg.py: the report
strings as they are, one hypothesis and one reference per case; Dia-Pangu's default, the paper's numbers).
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

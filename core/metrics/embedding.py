"""Embedding agreement (torch): how close a student's embeddings are to a teacher's, by cosine similarity and mean
squared error; used by the GigaPath distillation on each slide (all tiles' tokens, the class tokens, the slide
embedding)."""
from __future__ import annotations

AGREEMENT = ("tile_cos", "tile_mse", "cls_cos", "cls_mse", "slide_cos", "slide_mse")


def cosine(a, b):
    """Cosine similarity along the last dimension, in float32."""
    import torch

    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def mse(a, b) -> float:
    """Mean squared error of all elements, in float32."""
    return float(((a.float() - b.float()) ** 2).mean())


def embedding_agreement(student_hidden, teacher_hidden, student_slide, teacher_slide) -> dict[str, float]:
    """AGREEMENT of one slide: tokens (tiles, tokens, width) of the last block, their class tokens ([:, 0]) and the
    slide embeddings; cosines are means over the tokens."""
    sh, th = student_hidden.float(), teacher_hidden.float()
    return {"tile_cos": float(cosine(sh, th).mean()), "tile_mse": mse(sh, th),
            "cls_cos": float(cosine(sh[:, 0], th[:, 0]).mean()), "cls_mse": mse(sh[:, 0], th[:, 0]),
            "slide_cos": float(cosine(student_slide, teacher_slide)), "slide_mse": mse(student_slide, teacher_slide)}

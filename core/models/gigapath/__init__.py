"""Prov-GigaPath models for the distillation workload: the teacher (timm tile encoder + LongNet slide encoder), the
student (timm tile encoder + feature adaptor + a smaller LongNet slide encoder and its head), their builders on the
meta device, the tiny twins, checkpoint loading with the missing / unexpected keys named, and the student's export.

The package, by concern (every name below stays importable from `core.models.gigapath`; importing it imports no
torch):
  config.py    torch-free configs: weight file names, slide encoder archs and defaults, the teacher preset and
               the tiny twins' sizes, the teacher's config.json
  longnet.py   the LongNet slide encoder (GigaPath's LongNetViT with dilated attention, in plain PyTorch)
  models.py    the timm tile encoders, the teacher and the student (feature adaptor, slide encoder, head), their
               builders and parameter counts on the meta device
  loading.py   the teacher's and the student's weights, loaded strictly with the keys that do not fit named
  tiny.py      the tiny teacher in the released folder layout
  export.py    the trained student in timm's layout
"""
from __future__ import annotations

from core.models.gigapath.config import (SLIDE_ARCHS, SLIDE_DEFAULTS, SLIDE_WEIGHTS, TEACHER_PRESETS,  # noqa: F401
                                         TILE_WEIGHTS, TINY_STUDENT_ARCH, TINY_STUDENT_KWARGS, TINY_TEACHER,
                                         gigapath_segment_length, slide_config, teacher_config, teacher_width,
                                         tokens_of, weights_in)
from core.models.gigapath.export import export_student, timm_config  # noqa: F401
from core.models.gigapath.loading import (check_student_weights, check_teacher_files, fit_state,  # noqa: F401
                                          key_problems, load_student_weights, load_teacher, load_teacher_slide,
                                          read_state_dict,
                                          student_state)
from core.models.gigapath.longnet import LongNetViT, dilated_attention, grid_pos_embed  # noqa: F401
from core.models.gigapath.models import (build_student, build_teacher, cosine, create_tile_encoder,  # noqa: F401
                                         encode_tiles, meta_counts, select_hidden, student_slide_config,
                                         tokens_per_tile)
from core.models.gigapath.tiny import write_tiny_teacher  # noqa: F401

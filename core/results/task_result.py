"""The typed result of one task: what a workload's `run` / `merge` returns, in named parts.

A workload returns a plain dict (the task entry writes it as JSON into tasks/<step>.rank<R>.json, tests and the
merge steps read those keys); `TaskResult.to_dict()` gives exactly that dict and `TaskResult.from_dict()` reads it
back into its parts, so the summary (core.results.summary) prints named parts instead of guessing which keys are
scalars worth showing. The dict's layout, which `from_dict` reads and `to_dict` writes:

  training keys      the Trainer's own (core.engine.Trainer.fit: steps, start_step, loss_plot, final_loss, losses,
                     the checksums, restart_count) plus first_loss -> `training` (present when "steps" is)
  "evaluation": {..} a workload that trains, then scores the model: its result files and its metrics -> `files`
                     ("evaluation.<name>") and `metrics`; `evaluated` is True
  "untrained": {..}  the same scores of the model before training -> `untrained` (its files are listed in `files`
                     as "untrained.<name>" for the summary, and stay inside `untrained`)
  result files       a value ending in .csv / .json / .png -> `files` (at the top level, or nested in a value:
                     "<key>.<name>", listed for the summary and kept inside that value)
  scalars            without an "evaluation": the task's numbers and short text are its `metrics` (rank,
                     world_size and pid are bookkeeping: `extra`)
  the rest           -> `extra`, as it is
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Optional, Union

RESULT_FILE_SUFFIXES = (".csv", ".json", ".png")
EVALUATION, UNTRAINED = "evaluation", "untrained"
BOOKKEEPING = ("rank", "world_size", "pid")


class _Unset(enum.Enum):
    """A training field the workload's dict does not hold (not the same as holding None); pickles by name."""
    UNSET = 0


UNSET = _Unset.UNSET


@dataclass
class Training:
    """The training part of a result: the keys core.engine.Trainer.fit returns (plus the workload's first_loss).
    A field left UNSET is absent from the dict (a workload may pop `losses`, only some report `first_loss`)."""
    steps: int
    start_step: Union[int, _Unset] = UNSET
    first_loss: Union[Optional[float], _Unset] = UNSET
    final_loss: Union[Optional[float], _Unset] = UNSET
    losses: Union[Optional[list], _Unset] = UNSET
    loss_plot: Union[Optional[str], _Unset] = UNSET
    checksum: Union[Optional[str], _Unset] = UNSET
    resumed_checksum: Union[Optional[str], _Unset] = UNSET
    saved_checksum: Union[Optional[str], _Unset] = UNSET
    frozen_checksum_before: Union[Optional[str], _Unset] = UNSET
    frozen_checksum_after: Union[Optional[str], _Unset] = UNSET
    restart_count: Union[Optional[int], _Unset] = UNSET

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: dict) -> "Training":
        return cls(**{k: d[k] for k in cls.keys() if k in d})

    def to_dict(self) -> dict:
        return {k: v for k in self.keys() if (v := getattr(self, k)) is not UNSET}

    @property
    def resumed_at(self) -> int:
        """The step a resumed run started from (0 for a fresh run)."""
        return self.start_step if isinstance(self.start_step, int) else 0


@dataclass
class TaskResult:
    """One task's result in parts. `metrics` and `files` keep the order the workload wrote them in (the summary
    prints them in that order); `files` maps a dotted name ("evaluation.csv", "loss_plot") to the path."""
    training: Optional[Training] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    untrained: Optional[dict] = None
    files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    evaluated: bool = False  # metrics and their files sit under the dict's "evaluation" key

    # ------------------------------------------------------------ dict -> parts
    @classmethod
    def from_dict(cls, result: Any) -> "TaskResult":
        """The parts of a workload's result dict; a plain value (not a dict) is `metrics["result"]` where it is a
        number or text, else `extra["result"]`."""
        if isinstance(result, TaskResult):
            return result
        if not isinstance(result, dict):  # a plain value: shown as "result" (to_dict gives {"result": value})
            files = dict(result_files(result))
            if files or not _is_scalar(result):
                return cls(files=files, extra={"result": result})
            return cls(metrics={"result": result})
        training_keys = set(Training.keys())
        training = Training.from_dict(result) if "steps" in result else None
        evaluation = result.get(EVALUATION)
        evaluated = isinstance(evaluation, dict)
        untrained = result.get(UNTRAINED) if isinstance(result.get(UNTRAINED), dict) else None
        out = cls(training=training, untrained=untrained, evaluated=evaluated,
                  files=dict(result_files(result)))
        for key, value in result.items():
            if training is not None and key in training_keys:
                continue
            if evaluated and key == EVALUATION:
                out.metrics.update({k: v for k, v in value.items() if not _own_file(k, v)})
            elif untrained is not None and key == UNTRAINED:
                continue
            elif _own_file(key, value):
                continue  # in `files`
            elif not evaluated and _is_scalar(value) and key not in training_keys and key not in BOOKKEEPING:
                out.metrics[key] = value
            else:
                out.extra[key] = value
        return out

    # ------------------------------------------------------------ parts -> dict
    def to_dict(self) -> dict:
        """The workload's result dict: JSON-ready, the layout `from_dict` reads."""
        out: dict[str, Any] = dict(self.training.to_dict()) if self.training is not None else {}
        top = {k: v for k, v in self.files.items() if k and "." not in k and not _in_training(self.training, k)}
        nested = {k[len(EVALUATION) + 1:]: v for k, v in self.files.items()
                  if k.startswith(EVALUATION + ".") and "." not in k[len(EVALUATION) + 1:]}
        out.update(top)
        if self.evaluated:
            out.update(self.extra)
            out[EVALUATION] = {**nested, **self.metrics}
        else:
            out.update(self.metrics)
            out.update(self.extra)
        if self.untrained is not None:
            out[UNTRAINED] = self.untrained
        return out

    # ------------------------------------------------------------ for the summary
    def headline(self) -> dict[str, Any]:
        """The scalar results a person reads first: the evaluation's (or the task's own) numbers and labels."""
        return {k: v for k, v in self.metrics.items() if _is_scalar(v)}


def is_result_file(value: Any) -> bool:
    """A result file a person opens (a table, metrics, a plot): a path ending in .csv / .json / .png."""
    return isinstance(value, str) and value.endswith(RESULT_FILE_SUFFIXES)


def result_files(result: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, path) of every result file in a result dict, however deep, in the dict's order."""
    if isinstance(result, dict):
        for key, value in result.items():
            yield from result_files(value, f"{prefix}{key}.")
    elif is_result_file(result):
        yield prefix.rstrip("."), result


def _own_file(key: str, value: Any) -> bool:
    """A result file that `files` holds under its own dotted name (a key with a dot in it stays where it is)."""
    return is_result_file(value) and "." not in key


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _in_training(training: Optional[Training], key: str) -> bool:
    return training is not None and key in Training.keys()

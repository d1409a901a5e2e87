"""The project's error types, on the ground floor: every layer (configuration, plan, data readers, models,
workloads) raises these, and nothing here imports anything of the project."""
from __future__ import annotations


class SpecError(Exception):
    """A bad spec or profile: the message names the file, the field and the fix."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems  # (field path, message incl. fix)
        lines = [f"{source}: {field}: {msg}" if field else f"{source}: {msg}" for field, msg in problems]
        super().__init__("\n".join(lines))


class FieldError(ValueError):
    """A problem found while planning or reading inputs, tied to one spec field (the plan adds the file name)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class DatasetError(FieldError):
    """A dataset the job cannot use, tied to the spec field that points at it (data.path, data.labels_csv, ...);
    the message names the file (and the line) and what is wrong. The data readers raise it; a workload's planner
    turns it into its own FieldError."""


class ModelFolderError(ValueError):
    """A local model folder without a file the model needs (config.json, weights, tokenizer); the message names the
    folder and the file."""

"""Results of a task: the typed result a workload returns (TaskResult, Training), the one writer of a result folder
(ResultFolder: CSV, metrics.json, PNG, each atomic) and the summary a finished submission prints
(core.results.summary.report_results, imported from there: it reads the run folder)."""
from core.results.task_result import TaskResult, Training, is_result_file, result_files  # noqa: F401
from core.results.writer import ResultFolder  # noqa: F401

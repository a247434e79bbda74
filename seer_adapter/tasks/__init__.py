"""Long-context task suite: RULER-style tasks generated offline over held-out Shakespeare, scored by recall and
exact match, run under every block selector at equal density.

>>> from seer_adapter.tasks import evaluate_tasks, format_task_table
>>> rows = evaluate_tasks(model, tokenizer, tasks="niah_single,variable_tracking", lengths=(4096, 8192),
...                       selectors=("dense", "gate", "moba"), densities=(0.3, 0.1), num_samples=8)
>>> print(format_task_table(rows))

* `seer_adapter.tasks.generation`: the tasks (`TASKS`, `TaskGenerator`, `generate_samples`);
* `seer_adapter.tasks.scoring`: `normalize_answer`, `answer_recall`, `answer_exact_match`;
* `seer_adapter.tasks.evaluate`: `evaluate_tasks`, `greedy_generate`, `format_task_table`.
"""

from .evaluate import (
    DECODE_MODES,
    build_task_samples,
    evaluate_tasks,
    format_task_table,
    greedy_generate,
    max_positions,
    selector_free_blocks,
)
from .generation import (
    DEFAULT_TASKS,
    TASK_ALIASES,
    TASKS,
    Haystack,
    TaskError,
    TaskGenerator,
    TaskSample,
    TaskSpec,
    generate_samples,
    resolve_tasks,
)
from .scoring import answer_exact_match, answer_recall, normalize_answer, score_answer

__all__ = [
    "DECODE_MODES",
    "DEFAULT_TASKS",
    "TASKS",
    "TASK_ALIASES",
    "Haystack",
    "TaskError",
    "TaskGenerator",
    "TaskSample",
    "TaskSpec",
    "answer_exact_match",
    "answer_recall",
    "build_task_samples",
    "evaluate_tasks",
    "format_task_table",
    "generate_samples",
    "greedy_generate",
    "max_positions",
    "normalize_answer",
    "resolve_tasks",
    "score_answer",
    "selector_free_blocks",
]

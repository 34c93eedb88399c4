"""The tasks kdlab trains, one module each; importing this package registers every one of them.

Adding a task: one new module here (a `TaskDefinition` subclass under `@register_task`), its config
section in `kdlab.config.schema`, and its tests; see docs/architecture.md.
"""

from __future__ import annotations

import importlib
import pkgutil

from kdlab.tasks.base import (
    DEFAULT_TASK,
    CacheHooks,
    TaskDefinition,
    build_model,
    check_teacher_fits,
    check_teacher_task,
    get_task,
    load_teacher,
    model_from_checkpoint,
    register_task,
    task_names,
    task_of,
    teacher_loader,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DEFAULT_TASK", "CacheHooks", "TaskDefinition", "build_model", "check_teacher_fits", "check_teacher_task",
    "get_task",
    "load_teacher", "model_from_checkpoint", "register_task", "task_names", "task_of", "teacher_loader",
]  # fmt: skip

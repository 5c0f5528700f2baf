"""Tasks: what differs between kinds of model (batch contents, loss, validation metric, named
outputs), chosen by name and recorded in ``model.json``. See :mod:`medseg.tasks.base`."""

from medseg.tasks.base import TASKS, Batch, Task, get_task, register_task

__all__ = ["TASKS", "Batch", "Task", "get_task", "register_task"]

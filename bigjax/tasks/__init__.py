"""Objectives. `config.task.name='classification'` builds
`bigjax.tasks.classification.Task(data_info, **config.task.kwargs)`; `base.py` states the interface
(prepare, output size, loss and metrics, eval outputs, eval report) and the derived `DataInfo`.
"""

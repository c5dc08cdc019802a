"""Objectives. `config.task.name='classification'` builds `bigjax.tasks.classification.Task(**kwargs)`.

A Task turns model outputs and a batch {'inputs', 'label'} into a training loss and metrics
(`loss_and_metrics`, on device, inside the jitted step), and turns the gathered eval outputs into a
report (`eval_report`, on the host).
"""

"""Sweep launchers, one module each, picked by `--launcher=NAME` (base.py: the interface).

local  subprocesses on this machine (the default)
slurm  one SLURM job per run through submitit, as a job array
ray    one Ray task per run on a Ray cluster
"""

from bigjax import registry

LAUNCHERS = registry.Registry(
  'launchers', '--launcher', package='bigjax.sweep.launchers', attr='Launcher'
)

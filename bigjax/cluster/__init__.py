"""Running bigjax on clusters: what a run asks for (resources), SLURM from the submitting host
(slurm: checks, submitit executor, job states), and the body of a cluster job (train_job).

Used by the sweep launchers (bigjax/sweep/launchers/) and by bigjax-launch (bigjax/launch.py).
"""

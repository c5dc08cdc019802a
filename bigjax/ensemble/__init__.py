"""Ensembles and uncertainty, one module per job.

- members.py      config.ensemble.members = N: N members in one jitted step (nn.vmap over a
                  leading 'members' axis that can be sharded over a mesh axis).
- uncertainty.py  NLL, Brier score, ECE and its reliability diagram, predictive entropy,
                  temperature scaling (host-side, numpy / scikit-learn / scipy).
- combine.py      bigjax-ensemble: the predictions of N finished runs (or MC-dropout samples of
                  one) combined, calibrated and reported, in distribution and on shifted inputs.
"""

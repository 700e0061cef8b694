"""Gradient and zeroth-order baselines the experiment runs beside ES, on the same model and data.

* ``adamw``: AdamW with backpropagation (a step costs 3 forward passes' worth of tokens).
* ``mezo``: MeZO-style two-point zeroth-order SGD (Malladi et al. 2023): ±εz from one seed,
  projected gradient, z regenerated from the seed instead of stored.

``loop.run_baseline`` drives either with the experiment's budget, held-out evaluations and resume.
"""

"""``make reproduce-table``: the results table of every method of a declared experiment matrix.

:mod:`~kdseg.reproduce.spec` (matrix, profile, papers' numbers), :mod:`~kdseg.reproduce.config_key`
(the resolved-config hash naming run folders), :mod:`~kdseg.reproduce.data`,
:mod:`~kdseg.reproduce.plan` (runs and their keys), :mod:`~kdseg.reproduce.execute` (one run's
stages), :mod:`~kdseg.reproduce.launch` (local or Slurm), :mod:`~kdseg.reproduce.tables`,
:mod:`~kdseg.reproduce.baseline`, :mod:`~kdseg.reproduce.figures`, :mod:`~kdseg.reproduce.main`.
"""

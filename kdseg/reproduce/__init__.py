"""``make reproduce-table``: the results table of every method in a declared experiment matrix.

``python -m kdseg.reproduce --profile smoke|cpu|paper`` reads

- the matrix (``experiments/reproduce/matrix.yaml``): settings (data x label budget), each with
  methods, each a list of stages (a config file + overrides; multi-stage methods such as ACTION
  hand a checkpoint from one stage to the next);
- a budget profile (``experiments/reproduce/profiles/<name>.yaml``): override files and lists
  applied after each method config (image size, steps, encoder, ramp-ups, seeds) and where the
  data comes from (real files, or the built-in phantoms for ``smoke``);
- the papers' reported numbers (``experiments/reproduce/paper_numbers.yaml``, one citation per
  number);

and runs every (setting, method, seed) as ``kdseg fit`` then ``kdseg test`` of the best checkpoint
by the validation monitor, in subprocesses, resumably, ``--jobs`` at a time; then writes
``table.md`` / ``table.csv`` / ``table.tex`` and figures under ``<results>/<profile>/``.

Modules, one concept each: :mod:`~kdseg.reproduce.spec` (reading and checking the three files),
:mod:`~kdseg.reproduce.config_key` (the resolved-config hash that names run folders),
:mod:`~kdseg.reproduce.data` (split files and phantom data), :mod:`~kdseg.reproduce.plan` (the
matrix expanded into runs with their keys), :mod:`~kdseg.reproduce.execute` (running them),
:mod:`~kdseg.reproduce.tables`, :mod:`~kdseg.reproduce.figures` and
:mod:`~kdseg.reproduce.main` (the command line).
"""

"""``make reproduce-table``: every run of a declared experiment matrix (``spec`` the files, ``data``,
``plan`` runs and keys, ``execute`` one run, ``launch`` local or Slurm, ``main`` the command, which
hands the results to :mod:`kdseg.results` for the tables and figures)."""

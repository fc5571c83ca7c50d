"""``make reproduce-table``: the results table of every method of a declared experiment matrix
(``spec`` the files, ``data``, ``plan`` runs and keys, ``execute`` one run, ``launch`` local or
Slurm, ``tables``, ``baseline``, ``figures``, ``main`` the command)."""

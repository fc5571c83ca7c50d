"""The report of a reproduction: per-setting tables (``tables``) with paired intervals against the
label-only baseline (``baseline``) and the curves' flattening sentence (``curves``), and the curve and
qualitative figures (``figures``). It reads what :mod:`kdseg.reproduce` planned and ran (its specs and
:class:`~kdseg.reproduce.execute.RunResult`); ``python -m kdseg.reproduce`` calls it after the runs."""

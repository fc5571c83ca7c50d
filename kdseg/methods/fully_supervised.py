"""``fully_supervised``: the upper bound, every train patient densely labeled."""

from __future__ import annotations

from kdseg.methods.supervised import Supervised


class FullySupervised(Supervised):
    """The same loss as :class:`~kdseg.methods.supervised.Supervised` on all train labels.

    It refuses data with ``labeled_patients`` set below the train split, so a table's upper bound
    cannot silently be trained on a subset.
    """

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = self.trainer.datamodule
        if datamodule is not None and getattr(datamodule, "unlabeled_volumes", []):
            raise ValueError(
                "FullySupervised is the all-labels upper bound but data.labeled_patients="
                f"{datamodule.labeled_patients} leaves {len(datamodule.unlabeled_volumes)} train "
                "volumes unlabeled: set data.labeled_patients to null"
            )

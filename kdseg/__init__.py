"""kdseg: label-efficient medical image segmentation by knowledge distillation."""

__version__ = "0.1.0"

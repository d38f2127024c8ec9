"""mltrack: train torchvision image classifiers with MLflow as the system of record.

Importing the package is cheap (no torch, no mlflow); see DESIGN.md for the module map.
"""
from __future__ import annotations

__version__ = "0.1.0"

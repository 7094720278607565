"""Analyses of trained models: S4 cloud robustness (``s4_clouds``), LIANet rate-distortion (``compression``)."""

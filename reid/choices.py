"""The named choices of configs and command lines (Literal types), importable without torch so that the
CLIs answer `--help` at once."""

from __future__ import annotations

from typing import Literal

Arch = Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large"]
Weighting = Literal["fedpav", "cdw", "cdw_x_size"]  # n_k, d_k or n_k * d_k
BNPolicy = Literal["first", "average", "local"]
Estimator = Literal["mean", "median", "trimmed_mean"]
OutlierRule = Literal["none", "norm", "cdw", "norm_or_cdw"]
Algorithm = Literal["local", "fedpav", "fednova", "cdw", "kd", "cdw_kd", "cluster", "central"]
Transport = Literal["none", "mqtt"]

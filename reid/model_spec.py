"""`ModelSpec`: what rebuilds a model's architecture, without PyTorch (model contracts, configs, messages).

The network itself is in `reid.model`; this module stays importable where torch is not loaded (the
feature service reads model contracts and never builds a network).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from reid.choices import Arch


class ModelSpec(BaseModel):
    """Everything needed to rebuild a model's architecture (not its weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Arch = Field("resnet50", description="backbone: resnet18/34/50, mobilenet_v3_small/large")
    embed_dim: int = Field(512, gt=0, description="embedding size (the retrieval feature)")
    last_stride: Literal[1, 2] = Field(
        2, description="stride of the last ResNet stage (1: the ReID trick, 2x larger final map)"
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout before the classifier")

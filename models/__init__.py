"""PyTorch definitions of the Embedding&MLP base model, DIN, DIEN and DSIN."""

from __future__ import annotations

from models.base import BaseModel, CTRModel, ModelOutput
from models.config import ModelConfig
from models.dien import DIEN
from models.din import DIN
from models.dsin import DSIN

MODELS: dict[str, type[CTRModel]] = {"base": BaseModel, "din": DIN, "dien": DIEN, "dsin": DSIN}


def build_model(kind: str, cfg: ModelConfig) -> CTRModel:
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(MODELS)}")
    return MODELS[kind](cfg)


__all__ = ["DIEN", "DIN", "DSIN", "MODELS", "BaseModel", "CTRModel", "ModelConfig", "ModelOutput", "build_model"]

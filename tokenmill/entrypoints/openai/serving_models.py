"""GET /v1/models: the names this server answers to."""

from __future__ import annotations

import time

from tokenmill.entrypoints.openai.protocol import ModelCard, ModelList
from tokenmill.entrypoints.openai.serving_engine import OpenAIServing


class OpenAIServingModels(OpenAIServing):
    def __init__(self, *args, model_root: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model_root = model_root
        self.created = int(time.time())

    def card(self, name: str) -> ModelCard:
        self.check_model(name)
        return ModelCard(id=name, created=self.created, root=self.model_root, max_model_len=self.max_model_len)

    def list_models(self) -> ModelList:
        return ModelList(data=[self.card(name) for name in self.model_names])

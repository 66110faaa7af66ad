"""Model factory of the example plug-in: ``build(config) -> torch.nn.Module``."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class CharLSTM(nn.Module):
    """A byte-level LSTM language model; small, and nothing like the built-in GPT."""

    def __init__(
        self, vocab_size: int = 258, dim: int = 64, hidden: int = 128, layers: int = 1
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.rnn = nn.LSTM(dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids: Tensor, targets: Tensor) -> Tensor:
        """The plug-in contract: mean next-token cross-entropy as a scalar."""
        hidden, _ = self.rnn(self.embed(input_ids))
        logits: Tensor = self.head(hidden)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build(config: dict[str, Any]) -> nn.Module:
    """Called with ``ModelSpec.options`` under ``torch.manual_seed(ModelSpec.seed)``."""
    return CharLSTM(**config)

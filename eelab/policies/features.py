"""Exit features: what learned policies (alpha gates, the DQN agent and its environment) read of one exit's output."""
from __future__ import annotations

import math

import torch

from ..errors import EelabError
from ..records import ExitRecord

NUM_CONFIDENCE_FEATURES = 5  # top-3 probabilities, entropy score, margin; then a one-hot exit index


def exit_features(k: int, logits_k: torch.Tensor, num_exits: int) -> torch.Tensor:
    """Features of exit k's output that learned policies read: logits_k [B, C] -> float32 [B, 5 + K] in [0, 1].

    Columns: the three largest softmax probabilities, sorted (zero-padded when C < 3); the entropy score
    1 - H(p) / log C (1 is one-hot); the margin top-1 minus top-2; one-hot of the exit index k over K exits.
    """
    if not 0 <= k < num_exits:
        raise EelabError(f"exit index {k} is outside [0, {num_exits - 1}]")
    b, c = logits_k.shape
    p = torch.softmax(logits_k.float(), dim=-1)
    top = p.topk(min(3, c), dim=-1).values
    top = torch.cat([top, top.new_zeros(b, 3 - top.shape[1])], dim=1)
    entropy = 1.0 - torch.special.entr(p).sum(dim=-1) / math.log(max(c, 2))
    onehot = torch.zeros(b, num_exits)
    onehot[:, k] = 1.0
    # rounding can push the entropy score a hair outside [0, 1]; the gym observation space is [0, 1]
    return torch.cat([top, entropy.clamp(0, 1).unsqueeze(1), (top[:, 0] - top[:, 1]).unsqueeze(1), onehot], 1)


def record_features(record: ExitRecord) -> torch.Tensor:
    """exit_features of every exit of a record, computed exit by exit exactly as a step sees them: [N, K, F]."""
    return torch.stack([exit_features(k, record.logits[:, k].contiguous(), record.k) for k in range(record.k)], 1)

"""Multi-layer perceptron."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
  """x [B, D] -> logits [B, num_outputs]; ReLU hidden layers of sizes `hidden`."""
  hidden: Sequence[int] = (32,)
  num_outputs: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
    return nn.Dense(self.num_outputs, name="output")(x)

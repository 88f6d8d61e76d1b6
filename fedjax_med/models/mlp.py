"""Multi-layer perceptron."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from fedjax_med.models.dense import Dense


class MLP(nn.Module):
  """x [B, ...] -> logits [B, num_outputs]; ReLU hidden layers of sizes `hidden`.

  The input is flattened to [B, D]. The layers are `fedjax_med.models.dense.Dense`:
  the function (and the parameters a key gives) of `flax.linen.Dense`, with a
  kernel gradient that stays fast when clients are vmapped (see that module).
  """
  hidden: Sequence[int] = (32,)
  num_outputs: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(Dense(width, name=f"hidden_{i}")(x))
    return Dense(self.num_outputs, name="output")(x)

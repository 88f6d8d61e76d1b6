"""Logistic regression: one linear layer, logits out (FLamby's heart-disease baseline).

FLamby's `Baseline` is Linear(13, 1) followed by a sigmoid; here the module
returns the logit and the loss applies the sigmoid (numerically stabler,
identical model).
"""

from __future__ import annotations

import flax.linen as nn
import jax


class LogisticRegression(nn.Module):
  """x [B, D] -> logits [B, num_outputs] (num_outputs = 1 for a binary task)."""
  num_outputs: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_outputs, name="linear")(x)

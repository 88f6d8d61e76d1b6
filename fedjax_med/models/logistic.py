"""Logistic regression: one linear layer, logits out (FLamby's heart-disease baseline).

FLamby's `Baseline` is Linear(13, 1) followed by a sigmoid; here the module
returns the logit and the loss applies the sigmoid (numerically stabler,
identical model). The same module with no sigmoid is FLamby's linear Cox
model for TCGA-BRCA (Linear(39, 1)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_linear_init(fan_in: int):
  """PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / jnp.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class LogisticRegression(nn.Module):
  """x [B, D] -> logits [B, num_outputs] (num_outputs = 1 for a binary task).

  Attributes:
    num_outputs: output width.
    torch_init: initialise like PyTorch's nn.Linear (uniform in
      +-1/sqrt(D) for weight and bias), as FLamby's baselines start; default
      is Flax's (LeCun normal weight, zero bias).
  """
  num_outputs: int = 1
  torch_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    if self.torch_init:
      init = torch_linear_init(x.shape[-1])
      dense = nn.Dense(self.num_outputs, kernel_init=init, bias_init=init, name="linear")
    else:
      dense = nn.Dense(self.num_outputs, name="linear")
    return dense(x)

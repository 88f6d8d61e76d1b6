"""Flax models. The core only ever uses a model through `apply(params, x)`."""

from fedjax_med.models.cnn import CNN, PatchConv
from fedjax_med.models.dense import Dense
from fedjax_med.models.logistic import LogisticRegression
from fedjax_med.models.mlp import MLP
from fedjax_med.models.unet import UNet, num_params
from fedjax_med.models.unet3d import UNet3D

__all__ = ["CNN", "Dense", "LogisticRegression", "MLP", "PatchConv", "UNet", "UNet3D", "num_params"]

"""Flax NNX models for ``rmsprop_jax.demo``: linear regression, MLPs, a CNN, a GRU, an LSTM."""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "CNN",
    "MLP",
    "DeepTanhMLP",
    "GRUClassifier",
    "LSTMClassifier",
    "LinearRegression",
    "PatchConv",
]


class PatchConv(nnx.Module):
    """A zero-padded 2-D convolution written as image patches times a matrix.

    Same function as ``nnx.Conv``, but ``vmap`` over parameters (the demo trains several
    learning rates and seeds at once) turns it into one batched matrix product, where
    ``nnx.Conv`` becomes a grouped convolution that is many times slower on CPU.

    Args:
      in_features: channels of the input.
      out_features: channels of the output.
      size: height and width of the kernel.
      strides: the stride along height and width.
      rngs: the random streams the kernel is drawn from.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        size: int = 3,
        strides: int = 1,
        rngs: nnx.Rngs,
    ) -> None:
        fan_in = in_features * size * size
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (fan_in, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype=jnp.float32))
        self.size, self.strides = size, strides

    def __call__(self, x: jax.Array) -> jax.Array:
        """Convolves images (batch, height, width, in_features); same padding, strided."""
        # Pad, then take the size*size shifted (and strided) views and stack them as channels.
        pad, step = self.size // 2, self.strides
        height, width = -(-x.shape[1] // step), -(-x.shape[2] // step)
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        views = [
            padded[:, i : i + step * (height - 1) + 1 : step, j : j + step * (width - 1) + 1 : step]
            for i in range(self.size)
            for j in range(self.size)
        ]
        patches = jnp.concatenate(views, axis=-1)
        return patches @ self.kernel[...] + self.bias[...][None, None, None, :]


class LinearRegression(nnx.Module):
    """``y = x @ w + b`` with one output.

    Args:
      features: the size of an input.
      rngs: the random streams the weights are drawn from.
    """

    def __init__(self, features: int, *, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Predictions of shape (batch, 1) for inputs of shape (batch, features)."""
        return self.linear(x)


class MLP(nnx.Module):
    """Flattens the input, then one ReLU hidden layer.

    Args:
      input_shape: the shape of one example.
      classes: the number of logits.
      hidden: the width of the hidden layer.
      rngs: the random streams the weights are drawn from.
    """

    def __init__(
        self, input_shape: tuple[int, ...], classes: int, *, hidden: int = 128, rngs: nnx.Rngs
    ) -> None:
        self.hidden = nnx.Linear(math.prod(input_shape), hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of shape (batch, classes) for a batch of examples."""
        x = jnp.reshape(x, (x.shape[0], -1))
        return self.out(nnx.relu(self.hidden(x)))


class DeepTanhMLP(nnx.Module):
    """Flattens the input, then ``depth`` narrow tanh layers: a network whose gradients fade.

    Each tanh layer multiplies the backpropagated gradient by its weights and by
    ``tanh' <= 1``, so with LeCun-normal weights the gradient reaching the first layers is
    much smaller than the one at the read-out. Plain gradient descent then barely moves the
    early layers, while RMSProp-like methods rescale every parameter's step by its own
    gradient's size.

    Args:
      input_shape: the shape of one example.
      classes: the number of logits.
      depth: the number of tanh layers.
      width: the width of each tanh layer.
      rngs: the random streams the weights are drawn from.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        classes: int,
        *,
        depth: int = 12,
        width: int = 16,
        rngs: nnx.Rngs,
    ) -> None:
        sizes = [math.prod(input_shape)] + [width] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
        self.out = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of shape (batch, classes) for a batch of examples."""
        x = jnp.reshape(x, (x.shape[0], -1))
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.out(x)


class CNN(nnx.Module):
    """Two 3x3 convolutions (the second with stride 2), then a linear read-out.

    Images larger than 8x8 (MNIST, CIFAR-10) get a third, strided convolution first, so the
    read-out stays small.

    Args:
      input_shape: ``(height, width, channels)`` of one image.
      classes: the number of logits.
      rngs: the random streams the weights are drawn from.
    """

    def __init__(self, input_shape: tuple[int, ...], classes: int, *, rngs: nnx.Rngs) -> None:
        height, width, channels = input_shape
        self.stem = (
            PatchConv(channels, 16, strides=2, rngs=rngs) if max(height, width) > 8 else None
        )
        if self.stem is not None:
            height, width, channels = -(-height // 2), -(-width // 2), 16
        self.conv1 = PatchConv(channels, 16, rngs=rngs)
        self.conv2 = PatchConv(16, 32, strides=2, rngs=rngs)
        self.out = nnx.Linear(-(-height // 2) * -(-width // 2) * 32, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of shape (batch, classes) for images (batch, height, width, channels)."""
        if self.stem is not None:
            x = nnx.relu(self.stem(x))
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        return self.out(jnp.reshape(x, (x.shape[0], -1)))


class GRUClassifier(nnx.Module):
    """A GRU over the time axis of (batch, time, features); classifies from the last state.

    Args:
      features: the size of the input at one time step.
      classes: the number of logits.
      hidden: the size of the GRU's state.
      rngs: the random streams the weights are drawn from.
    """

    def __init__(self, features: int, classes: int, *, hidden: int = 32, rngs: nnx.Rngs) -> None:
        self.cell = nnx.GRUCell(features, hidden, rngs=rngs)
        self.hidden = hidden
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of shape (batch, classes) for sequences (batch, time, features)."""
        carry = jnp.zeros((x.shape[0], self.hidden), dtype=x.dtype)
        return self.out(_scan_cell(self.cell, carry, x))


class LSTMClassifier(nnx.Module):
    """An LSTM (``nnx.OptimizedLSTMCell``) over (batch, time, features); reads out the last h.

    Args:
      features: the size of the input at one time step.
      classes: the number of logits.
      hidden: the size of the LSTM's cell and hidden state.
      rngs: the random streams the weights are drawn from.
    """

    def __init__(self, features: int, classes: int, *, hidden: int = 32, rngs: nnx.Rngs) -> None:
        self.cell = nnx.OptimizedLSTMCell(features, hidden, rngs=rngs)
        self.hidden = hidden
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of shape (batch, classes) for sequences (batch, time, features)."""
        zeros = jnp.zeros((x.shape[0], self.hidden), dtype=x.dtype)
        _, h = _scan_cell(self.cell, (zeros, zeros), x)  # the carry is (cell state c, output h)
        return self.out(h)


def _scan_cell(cell: Any, carry: Any, x: jax.Array) -> Any:
    """Runs a recurrent cell over the time axis of (batch, time, features); the last carry."""

    def step(carry: Any, x_t: jax.Array) -> tuple[Any, None]:
        carry, _ = cell(carry, x_t)
        return carry, None

    # Time-major for the scan; the cell only reads its parameters, so closing over it is safe.
    carry, _ = jax.lax.scan(step, carry, jnp.swapaxes(x, 0, 1))
    return carry

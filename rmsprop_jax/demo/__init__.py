"""A demo built on rmsprop_jax: RMSProp variants against other optimizers on small Flax models.

Run it with ``python -m rmsprop_jax.demo`` (``--help`` lists the flags); it needs the
``examples`` extra (flax, scikit-learn, matplotlib; tqdm optional). The demo is an
application of the library's public API, not part of that API. Its modules:

* :mod:`rmsprop_jax.demo.data`: the data sets (scikit-learn's digits, synthetic tasks, MNIST
  and CIFAR-10 files);
* :mod:`rmsprop_jax.demo.models`: the Flax NNX models (imported on first use, so that this
  package imports without flax);
* :mod:`rmsprop_jax.demo.training`: the optimizers compared, the tasks and the training loop,
  whose names this package re-exports;
* :mod:`rmsprop_jax.demo.report`: the table, the figures, the progress bar and the JSON.
"""

from rmsprop_jax.demo import data as data
from rmsprop_jax.demo import report as report
from rmsprop_jax.demo import training as training
from rmsprop_jax.demo.training import CONTENDERS as CONTENDERS
from rmsprop_jax.demo.training import QUICK_CONTENDERS as QUICK_CONTENDERS
from rmsprop_jax.demo.training import SENSITIVITY_DECAYS as SENSITIVITY_DECAYS
from rmsprop_jax.demo.training import SENSITIVITY_LEARNING_RATES as SENSITIVITY_LEARNING_RATES
from rmsprop_jax.demo.training import TASK_KEYS as TASK_KEYS
from rmsprop_jax.demo.training import Contender as Contender
from rmsprop_jax.demo.training import Task as Task
from rmsprop_jax.demo.training import build_tasks as build_tasks
from rmsprop_jax.demo.training import summarise as summarise
from rmsprop_jax.demo.training import train_contender as train_contender
from rmsprop_jax.demo.training import train_sensitivity as train_sensitivity

# The three modules, and the names of training's own __all__ (re-exported above).
__all__ = ["data", "report", "training"]
__all__ += training.__all__

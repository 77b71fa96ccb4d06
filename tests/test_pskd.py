"""PSKD (calibjax.train.pskd): the targets and loss of two steps by hand, the memory written at the batch's
indices, its place in the train state, and the train method from the CLI (and where it is refused)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax.train import pskd
from test_cli import assert_one_line_error, cli, read_json

LABELS = np.array([0, 1, 1])


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_two_steps_by_hand():
  objective = pskd.make_objective(train_labels=LABELS, num_classes=2, steps_per_epoch=1, epochs=4)
  assert objective.uses_indices
  np.testing.assert_array_equal(objective.state["predictions"], np.eye(2)[LABELS])
  first = np.float32([[2.0, 0.0], [0.5, 1.0]])
  batch = {"labels": jnp.asarray(LABELS[[0, 2]]), "index": jnp.array([0, 2])}
  loss, state = objective.fn({}, objective.state, logits=jnp.asarray(first), features=None, batch=batch, key=None)
  # Epoch 0: the memory holds the one-hot labels, so the targets are one-hot: plain cross-entropy.
  np.testing.assert_allclose(loss, -np.mean([_log_softmax(first)[0, 0], _log_softmax(first)[1, 1]]), rtol=1e-6)
  remembered = np.exp(_log_softmax(first))
  np.testing.assert_allclose(state["predictions"], [remembered[0], [0, 1], remembered[1]], rtol=1e-6)
  assert int(state["step"]) == 1
  second = np.float32([[0.0, 1.0], [1.0, 3.0]])
  loss, state = objective.fn({}, state, logits=jnp.asarray(second), features=None, batch=batch, key=None)
  # Epoch 1: a = 0.8 * 2 / 4 = 0.4; targets 0.6 onehot + 0.4 (the softmax remembered from step 0).
  targets = 0.6 * np.eye(2)[LABELS[[0, 2]]] + 0.4 * remembered
  np.testing.assert_allclose(loss, -np.mean(np.sum(targets * _log_softmax(second), -1)), rtol=1e-6)
  assert float(pskd.alpha(3, alpha_T=0.8, epochs=4)) == pytest.approx(0.8)  # the last epoch reaches alpha_T


def test_the_loss_gradient_does_not_flow_into_the_memory():
  objective = pskd.make_objective(train_labels=LABELS, num_classes=2, steps_per_epoch=1, epochs=2)
  batch = {"labels": jnp.asarray(LABELS), "index": jnp.arange(3)}
  logits = jnp.float32([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
  state = objective.fn({}, objective.state, logits=logits, features=None, batch=batch, key=None)[1]
  grad = jax.grad(lambda z: objective.fn({}, state, logits=z, features=None, batch=batch, key=None)[0])(logits)
  targets = 0.2 * np.eye(2)[LABELS] + 0.8 * np.exp(_log_softmax(logits))  # epoch 1 of 2: a = 0.8
  np.testing.assert_allclose(grad, (np.exp(_log_softmax(logits)) - targets) / 3, atol=1e-6)  # softmax - target


@pytest.mark.slow
def test_pskd_trains_from_the_cli_and_is_refused_where_it_cannot_work(tmp_path):
  workdir = str(tmp_path / "pskd")
  result = cli("--config=configs/train.py:smoke,loss=pskd", "--quiet", workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert read_json(os.path.join(workdir, "config.json"))["loss"] == {"name": "pskd", "hparams": {"alpha_T": 0.8}}
  assert read_json(os.path.join(workdir, "results.json"))["raw"]["accuracy"] > 0.5
  assert_one_line_error(cli("--config=configs/train.py:smoke,loss=pskd,mixing=mixup", workdir=str(tmp_path / "m")),
                        "loss pskd", "use mixing=none")
  assert_one_line_error(cli("--config=configs/evaluate.py:smoke,loss=pskd,baseline=random",
                            workdir=str(tmp_path / "e")), "use it with the train method")

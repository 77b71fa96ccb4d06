"""The per-example losses (calibjax.train.per_example): PSKD's targets and loss over two steps by hand, CRL's
ranking term by hand, the memories written at the batch's indices, and both through the train method's CLI (and
where they are refused)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax.errors import ConfigError
from calibjax.main import run
from calibjax.train import per_example
from test_cli import cli, read_json

LABELS = np.array([0, 1, 1])


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_two_steps_by_hand():
  objective = per_example.make_pskd(per_example.TrainingData(LABELS, 2, 1, 4), alpha_T=0.8)
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
  assert float(per_example.pskd_alpha(3, alpha_T=0.8, epochs=4)) == pytest.approx(0.8)  # the last epoch: alpha_T


def test_the_pskd_gradient_does_not_flow_into_the_memory():
  objective = per_example.make_pskd(per_example.TrainingData(LABELS, 2, 1, 2), alpha_T=0.8)
  batch = {"labels": jnp.asarray(LABELS), "index": jnp.arange(3)}
  logits = jnp.float32([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
  state = objective.fn({}, objective.state, logits=logits, features=None, batch=batch, key=None)[1]
  grad = jax.grad(lambda z: objective.fn({}, state, logits=z, features=None, batch=batch, key=None)[0])(logits)
  targets = 0.2 * np.eye(2)[LABELS] + 0.8 * np.exp(_log_softmax(logits))  # epoch 1 of 2: a = 0.8
  np.testing.assert_allclose(grad, (np.exp(_log_softmax(logits)) - targets) / 3, atol=1e-6)  # softmax - target


def test_crl_ranking_by_hand_and_the_correctness_counts():
  history = np.float32([2, 0, 1, 3])  # counts of 4 examples after 3 epochs (steps_per_epoch 1, step 3)
  objective = per_example.make_crl(per_example.TrainingData(np.array([0, 1, 1, 0]), 2, 1, 10), rank_weight=1.0)
  state = {"correctness": jnp.asarray(history), "step": jnp.int32(3)}
  logits = np.float32([[2.0, 0.0], [0.0, 0.5], [3.0, 1.0]])
  batch = {"labels": jnp.array([0, 1, 1]), "index": jnp.array([0, 1, 2])}
  loss, new = objective.fn({}, state, logits=jnp.asarray(logits), features=None, batch=batch, key=None)
  log_probs = _log_softmax(logits)
  kappa = np.exp(log_probs.max(-1))
  # Normalised counts (c - 0) / (3 - 0) = 2/3, 0, 1/3; pairs (0, 1), (1, 2), (2, 0): targets +1, -1, -1.
  hinges = [max(0, -(kappa[0] - kappa[1]) + 2 / 3), max(0, (kappa[1] - kappa[2]) + 1 / 3),
            max(0, (kappa[2] - kappa[0]) + 1 / 3)]
  cross_entropy = -np.mean([log_probs[0, 0], log_probs[1, 1], log_probs[2, 1]])
  np.testing.assert_allclose(loss, cross_entropy + np.mean(hinges), rtol=1e-6)
  np.testing.assert_array_equal(new["correctness"], [3, 1, 1, 3])  # right, right, wrong; example 3 not in batch
  tied = per_example.crl_ranking(confidence=jnp.float32([0.9, 0.2]), correctness=jnp.float32([1, 1]),
                                 max_correctness=jnp.float32(1), history_min=jnp.float32(1))
  assert float(tied) == 0.0  # every example always right: nothing to rank, no division by zero


@pytest.mark.slow
@pytest.mark.parametrize("loss, hparams", [("pskd", {"alpha_T": 0.8}), ("crl", {"rank_weight": 1.0})])
def test_per_example_losses_train_from_the_cli(tmp_path, loss, hparams):
  workdir = str(tmp_path / loss)
  result = cli(f"--config=configs/train.py:smoke,loss={loss}", "--quiet", workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert read_json(os.path.join(workdir, "config.json"))["loss"] == {"name": loss, "hparams": hparams}
  assert read_json(os.path.join(workdir, "results.json"))["raw"]["accuracy"] > 0.5


@pytest.mark.parametrize("loss", ["pskd", "crl"])
def test_per_example_losses_are_refused_with_mixing_and_in_evaluate(tmp_path, loss):
  # The command line as a function: the same checks, the error the CLI prints as its one line.
  with pytest.raises(ConfigError, match=f"loss {loss} trains on integer labels.*use mixing=none"):
    run(f"configs/train.py:smoke,loss={loss},mixing=mixup", str(tmp_path / "m"), quiet=True)
  with pytest.raises(ConfigError, match="use it with the train method"):
    run(f"configs/evaluate.py:smoke,loss={loss},baseline=random", str(tmp_path / "e"), quiet=True)

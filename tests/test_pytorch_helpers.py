"""The PyTorch FedProx and SCAFFOLD helpers (``fedlift.client.pytorch``) against answers
computed by hand, and SCAFFOLD's client half against the server's."""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
from torch import nn

from fedlift.client.pytorch import PTFedProxLoss, PTScaffoldHelper, get_lr_values
from fedlift.errors import ConfigError
from fedlift.model import ParamsType, torch_params
from fedlift.server import Aggregate, Scaffold


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


# ------------------------------------------------------------------ FedProx


def test_fedprox_loss_is_half_mu_times_the_squared_distance() -> None:
    model = linear([[1.0, 2.0]], [0.5])
    global_model = linear([[0.0, 1.0]], [1.5])
    for p in global_model.parameters():
        p.requires_grad_(False)
    # ||w - w_g||^2 = 1^2 + 1^2 + (-1)^2 = 3;  mu / 2 * 3 = 0.1 * 3 = 0.3
    loss = PTFedProxLoss(mu=0.2)(model, global_model)
    assert loss.shape == () and loss.item() == pytest.approx(0.3)
    loss.backward()  # d/dw = mu * (w - w_g): [[0.2, 0.2]] and [-0.2]
    assert model.weight.grad is not None and model.bias.grad is not None
    np.testing.assert_allclose(model.weight.grad.numpy(), [[0.2, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(model.bias.grad.numpy(), [-0.2], rtol=1e-6)


def test_fedprox_loss_takes_the_received_params_as_the_global_model() -> None:
    model = linear([[1.0, 2.0]], [0.5])
    received = {"weight": torch.tensor([[0.0, 1.0]]), "bias": torch.tensor([1.5])}
    assert PTFedProxLoss(mu=0.2)(model, received).item() == pytest.approx(0.3)
    assert PTFedProxLoss(mu=0.0)(model, received).item() == 0.0


def test_fedprox_loss_refuses_bad_mu_and_a_global_model_that_does_not_match() -> None:
    with pytest.raises(ConfigError, match="mu"):
        PTFedProxLoss(mu=-0.1)
    with pytest.raises(ValueError):  # NVFlare raises ValueError; ConfigError is one
        PTFedProxLoss(mu=float("nan"))
    model = linear([[1.0, 2.0]], [0.5])
    with pytest.raises(ConfigError, match="no parameter 'bias'"):
        PTFedProxLoss(mu=0.1)(model, {"weight": torch.zeros(1, 2)})
    with pytest.raises(ConfigError, match="shape"):
        PTFedProxLoss(mu=0.1)(model, {"weight": torch.zeros(2, 1), "bias": torch.zeros(1)})


# ------------------------------------------------------------------ SCAFFOLD


def scaffold_model() -> nn.Sequential:
    """One trainable weight [[1, 2]] and a BatchNorm whose parameters are frozen: its
    weight, bias, statistics and int64 counter are never corrected."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
    for p in model[1].parameters():
        p.requires_grad_(False)
    return model


def controls(weight: list[list[float]]) -> dict[str, np.ndarray]:
    """The server's c as it sends it: the model's layout, float32 (integer keys too)."""
    out = {key: np.zeros(t.shape, np.float32) for key, t in scaffold_model().state_dict().items()}
    out["0.weight"] = np.array(weight, np.float32)
    return out


def corrected_steps(
    helper: PTScaffoldHelper, model: nn.Module, grad: list[float], rates: list[float]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One round's steps: per rate a data step ``w -= lr * g`` with a fixed g, then
    SCAFFOLD's correction. Returns the round's ``(c, c_i)``."""
    c_global, c_local = helper.get_params()
    for rate in rates:
        with torch.no_grad():
            model[0].weight -= rate * torch.tensor([grad])
        helper.model_update(model, rate, c_global, c_local)
    return c_global, c_local


def first_round(model: nn.Module, helper: PTScaffoldHelper) -> dict[str, np.ndarray]:
    """c = [0.5, -1], c_i = 0, x = [1, 2], g = [0.2, 0.4], two steps of lr 0.1."""
    helper.init(model)
    helper.load_global_controls({"scaffold_c_global": controls([[0.5, -1.0]]), "x": 1})
    global_model = copy.deepcopy(model)
    c_global, c_local = corrected_steps(helper, model, [0.2, 0.4], [0.1, 0.1])
    helper.terms_update(model, 0.1, c_global, c_local, global_model)
    return helper.get_delta_controls()


def test_scaffold_round_known_answer() -> None:
    model = scaffold_model()
    helper = PTScaffoldHelper()
    delta = first_round(model, helper)
    # each step: w -= 0.1 * (g + c - c_i) = 0.1 * [0.7, -0.6]
    # [1, 2] -> [0.93, 2.06] -> [0.86, 2.12]
    np.testing.assert_allclose(model[0].weight.detach().numpy(), [[0.86, 2.12]], rtol=1e-6)
    # c_i+ = c_i - c + (x - y) / (K * lr) = [0 - 0.5 + 0.14 / 0.2, 0 + 1 - 0.12 / 0.2] = [0.2, 0.4]
    assert list(delta) == list(model.state_dict())  # every key, the state_dict's order
    np.testing.assert_allclose(delta["0.weight"], [[0.2, 0.4]], rtol=1e-5)
    for key in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert delta[key].tolist() == [0.0], key
    assert delta["1.num_batches_tracked"].dtype == np.float32
    assert float(delta["1.num_batches_tracked"]) == 0.0
    assert helper.c_local is not None
    np.testing.assert_allclose(helper.c_local["0.weight"].numpy(), [[0.2, 0.4]], rtol=1e-5)
    sent = helper.result_meta()["scaffold_c_diff"]
    np.testing.assert_array_equal(sent["0.weight"], delta["0.weight"])


def test_scaffold_second_round_uses_c_i_and_the_sum_of_the_rates() -> None:
    model = scaffold_model()
    helper = PTScaffoldHelper()
    first_round(model, helper)  # c_i = [0.2, 0.4] now
    helper.load_global_controls(controls([[0.5, -1.0]]))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0]]))  # this round's x
    global_model = copy.deepcopy(model)
    # c - c_i = [0.3, -1.4]; g = [1, -1]; g + c - c_i = [1.3, -2.4]
    # lr 0.1: [1, 1] -> [0.87, 1.24];  lr 0.3: -> [0.48, 1.96]
    c_global, c_local = corrected_steps(helper, model, [1.0, -1.0], [0.1, 0.3])
    assert helper.cnt == 2
    np.testing.assert_allclose(model[0].weight.detach().numpy(), [[0.48, 1.96]], rtol=1e-6)
    helper.terms_update(model, 0.3, c_global, c_local, global_model)
    # c_i+ = c_i - c + (x - y) / (0.1 + 0.3) = [-0.3 + 0.52 / 0.4, 1.4 - 0.96 / 0.4] = [1, -1]
    # (K * curr_lr = 0.6 would give [0.567, -0.2]); delta = c_i+ - c_i = [0.8, -1.4]
    delta = helper.get_delta_controls()
    np.testing.assert_allclose(delta["0.weight"], [[0.8, -1.4]], rtol=1e-5)
    assert helper.c_local is not None
    np.testing.assert_allclose(helper.c_local["0.weight"].numpy(), [[1.0, -1.0]], rtol=1e-5)


def test_scaffold_helper_says_what_to_call_first() -> None:
    helper = PTScaffoldHelper()
    with pytest.raises(ConfigError, match=r"init\(model\)"):
        helper.load_global_controls(controls([[0.0, 0.0]]))
    model = scaffold_model()
    helper.init(model)
    for not_controls in ({"x": 1}, None):
        with pytest.raises(ConfigError, match="Is the server running SCAFFOLD"):
            helper.load_global_controls(not_controls)
    partial = controls([[0.0, 0.0]])
    del partial["0.weight"]
    with pytest.raises(ConfigError, match=r"missing \['0.weight'\], unexpected none"):
        helper.load_global_controls(partial)
    helper.load_global_controls(controls([[0.0, 0.0]]))
    c_global, c_local = helper.get_params()
    with pytest.raises(ConfigError, match=r"model_update\(\.\.\.\) after each optimizer step"):
        helper.terms_update(model, 0.1, c_global, c_local, copy.deepcopy(model))
    with pytest.raises(ConfigError, match=r"terms_update"):
        helper.get_delta_controls()
    bad = controls([[float("nan"), 0.0]])
    with pytest.raises(ConfigError, match="NaN or Inf"):
        helper.load_global_controls(bad)


def test_get_lr_values_reads_every_group() -> None:
    model = scaffold_model()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters()}], lr=0.5
    )
    assert get_lr_values(optimizer) == [0.1, 0.5]


def test_scaffold_client_and_server_halves_fit_together() -> None:
    """The server's c (its layout from the exported state_dict) loads into the helper, and
    the helper's delta c_i folds into the server's c: c = 0 + 1/1 * delta."""
    model = scaffold_model()
    server = Scaffold()
    server.start(torch_params(model))
    helper = PTScaffoldHelper()
    helper.init(model)
    helper.load_global_controls(server.state()["c"])
    global_model = copy.deepcopy(model)
    c_global, c_local = corrected_steps(helper, model, [0.2, 0.4], [0.1, 0.1])
    helper.terms_update(model, 0.1, c_global, c_local, global_model)
    delta = helper.get_delta_controls()
    # c = 0 and c_i = 0: c_i+ = (x - y) / 0.2 = g = [0.2, 0.4]
    np.testing.assert_allclose(delta["0.weight"], [[0.2, 0.4]], rtol=1e-5)
    aggregate = Aggregate(
        torch_params(model), ParamsType.FULL, {}, 1.0, 1, {"scaffold_c_diff": delta}
    )
    server.update(0, torch_params(global_model), aggregate)
    np.testing.assert_allclose(server.state()["c"]["0.weight"], [[0.2, 0.4]], rtol=1e-5)

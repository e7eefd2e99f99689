"""Balancer.to(device, dtype) and BalancedOptimizer.to: state, parameters (kept by identity),
defaults, and the optimizers' state following the parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlbal

M = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 5)
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(M))

    def losses(self, seed: int) -> list[torch.Tensor]:
        p = next(self.parameters())
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
        z = torch.tanh(self.trunk(x.to(device=p.device, dtype=p.dtype)))
        return [(h(z) - i).pow(2).mean() + 0.1 for i, h in enumerate(self.heads)]


def test_balancer_to_dtype_keeps_parameters_and_casts_state_and_defaults() -> None:
    net = Net()
    weighting = mtlbal.weighting.UncertaintyWeighting(M)
    log_vars = weighting.log_vars
    b = mtlbal.Balancer(net.trunk, weighting=weighting)
    assert b.to(dtype=torch.float64) is b
    assert weighting.log_vars is log_vars and log_vars.dtype == torch.float64
    net.double()
    info = b.backward(net.losses(0))
    assert info.weights.dtype == torch.float64
    assert log_vars.grad is not None and log_vars.grad.dtype == torch.float64

    famo = mtlbal.weighting.FAMO(M)
    mtlbal.Balancer(net.trunk, weighting=famo).to(None, torch.float64)
    assert famo.logits.dtype == torch.float64 and famo.exp_avg.dtype == torch.float64
    famo.reset()  # the declared defaults moved with the state
    assert famo.logits.dtype == torch.float64 and famo.exp_avg_sq.dtype == torch.float64
    assert mtlbal.Balancer(net.trunk).to("cpu").weighting is not None  # positional device


def test_balancer_to_meta_keeps_parameter_identity() -> None:
    weighting = mtlbal.weighting.UncertaintyWeighting(M)
    log_vars = weighting.log_vars
    famo = mtlbal.weighting.FAMO(M)
    for b in (
        mtlbal.Balancer(nn.Linear(2, 2), weighting=weighting),
        mtlbal.Balancer(nn.Linear(2, 2), weighting=famo),
    ):
        b.to("meta")
    assert weighting.log_vars is log_vars and log_vars.device.type == "meta"
    assert famo.logits.device.type == "meta"
    famo.reset()
    assert famo.logits.device.type == "meta"


def _wrapped(strategy_in_main: bool) -> tuple[Net, mtlbal.BalancedOptimizer]:
    net = Net()
    weighting = mtlbal.weighting.UncertaintyWeighting(M)
    params = list(net.parameters()) + (list(weighting.parameters()) if strategy_in_main else [])
    opt = mtlbal.wrap(
        torch.optim.Adam(params, lr=0.01), mtlbal.Balancer(net.trunk, weighting=weighting)
    )
    return net, opt


def _log_vars(opt: mtlbal.BalancedOptimizer) -> nn.Parameter:
    weighting = opt.balancer.weighting
    assert isinstance(weighting, mtlbal.weighting.UncertaintyWeighting)
    return weighting.log_vars


def _step(net: Net, opt: mtlbal.BalancedOptimizer, seed: int) -> None:
    opt.backward(net.losses(seed))
    opt.step()
    opt.zero_grad()


def test_wrapper_to_dtype_moves_the_strategy_optimizer_state_as_load_state_dict_would() -> None:
    net, opt = _wrapped(strategy_in_main=False)
    for s in range(2):
        _step(net, opt, s)
    net_ref, opt_ref = copy.deepcopy((net, opt))
    log_vars = _log_vars(opt)
    bopt = opt.balancer_optimizer
    assert bopt is not None and bopt.state[log_vars]["exp_avg"].dtype == torch.float32

    net.double()
    assert opt.to(dtype=torch.float64) is opt
    assert _log_vars(opt) is log_vars and log_vars.dtype == torch.float64
    assert bopt.param_groups[0]["params"][0] is log_vars
    for key in ("exp_avg", "exp_avg_sq"):
        assert bopt.state[log_vars][key].dtype == torch.float64
    for p in net.parameters():  # the wrapped optimizer's state follows the moved model
        assert opt.state[p]["exp_avg"].dtype == torch.float64

    # reference: torch's own policy (load_state_dict casts the state to the parameters)
    net_ref.double()
    ref_log_vars = _log_vars(opt_ref)
    ref_log_vars.data = ref_log_vars.data.double()
    for o in (opt_ref.optimizer, opt_ref.balancer_optimizer):
        assert o is not None
        o.load_state_dict(o.state_dict())
    before = log_vars.detach().clone()
    for s in range(2, 4):
        _step(net, opt, s)
        _step(net_ref, opt_ref, s)
    assert not torch.equal(log_vars.detach(), before)  # still stepped after the move
    assert torch.equal(log_vars.detach(), ref_log_vars.detach())
    for p, q in zip(net.parameters(), net_ref.parameters()):
        assert torch.equal(p, q)


def test_wrapper_to_with_strategy_parameters_in_the_main_optimizer() -> None:
    net, opt = _wrapped(strategy_in_main=True)
    assert opt.balancer_optimizer is None
    _step(net, opt, 0)
    log_vars = _log_vars(opt)
    net.double()
    opt.to(dtype=torch.float64)
    assert opt.state[log_vars]["exp_avg_sq"].dtype == torch.float64
    before = log_vars.detach().clone()
    _step(net, opt, 1)
    assert log_vars.dtype == torch.float64 and not torch.equal(log_vars.detach(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_wrapper_to_cuda() -> None:
    net, opt = _wrapped(strategy_in_main=False)
    _step(net, opt, 0)
    log_vars = _log_vars(opt)
    net.cuda()
    opt.to("cuda")
    bopt = opt.balancer_optimizer
    assert bopt is not None
    assert _log_vars(opt) is log_vars and log_vars.is_cuda
    state = bopt.state[log_vars]
    assert state["exp_avg"].is_cuda
    fused = bool(bopt.param_groups[0].get("fused"))
    assert state["step"].is_cuda == fused
    before = log_vars.detach().clone()
    _step(net, opt, 1)
    assert not torch.equal(log_vars.detach(), before)

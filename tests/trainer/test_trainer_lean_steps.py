"""The Trainer's per-step module calls made cheap while training (lorafleet.trainer.hf): same effect, restored."""

from __future__ import annotations

import pytest


def _model():  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)  # a frozen base weight next to trainable ones
    return torch, model


def test_train_and_zero_grad_keep_their_effect_and_are_restored() -> None:
    torch, model = _model()
    from lorafleet.trainer.hf import _lean_mode_and_zero_grad

    model.eval()
    with _lean_mode_and_zero_grad(model):
        assert model.train() is model
        assert all(m.training for m in model.modules())  # from eval, a full walk
        model.eval()  # evaluation inside the loop switches every module
        assert not any(m.training for m in model.modules())
        model.train()
        assert all(m.training for m in model.modules())
        model(torch.ones(2, 4)).sum().backward()
        assert model[2].weight.grad is not None and model[0].weight.grad is None
        model.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        model(torch.ones(2, 4)).sum().backward()
        model.zero_grad(set_to_none=False)  # the library's behaviour
        assert float(model[2].weight.grad.abs().sum()) == 0.0
    assert "train" not in vars(model) and "zero_grad" not in vars(model)
    assert type(model).train is torch.nn.Module.train


def test_accelerate_lomo_check_is_cached() -> None:
    pytest.importorskip("torch")
    accelerate_optimizer = pytest.importorskip("accelerate.optimizer")
    from lorafleet.trainer.hf import _cache_accelerate_lomo_check, _lomo_available

    original = accelerate_optimizer.is_lomo_available
    try:
        _cache_accelerate_lomo_check()
        assert accelerate_optimizer.is_lomo_available is _lomo_available
        assert _lomo_available() is _lomo_available()
    finally:
        accelerate_optimizer.is_lomo_available = original

"""ScheduleFreeSignSGD steps bit for bit as schedulefree's ScheduleFreeWrapper(SignSGD), and
their checkpoints load into each other."""

import io

import pytest
import torch
from schedulefree import ScheduleFreeWrapper
from sparsify.sign_sgd import SignSGD

from vlm_sparsify.schedule_free import ScheduleFreeSignSGD

SHAPES = [[(24, 16), (16,)], [(16, 24), (24,)], [(8, 16)]]
"""Parameter shapes per group: one group per source, as build_optimizers makes them."""
LRS = [1e-2, 3e-3, 5e-2]


def initial_params(dtype: torch.dtype) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for shapes in SHAPES]


def wrap(cls: type, params: list[list[torch.Tensor]], **kwargs) -> ScheduleFreeWrapper:
    """`cls(SignSGD(...))` over copies of `params` (one group each), in train mode."""
    groups = [
        {"params": [torch.nn.Parameter(p.clone()) for p in ps], "lr": lr}
        for ps, lr in zip(params, LRS, strict=True)
    ]
    opt = cls(SignSGD(groups), momentum=0.95, **kwargs)
    opt.train()
    return opt


def all_params(opt: ScheduleFreeWrapper) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def set_grads(opts: list[ScheduleFreeWrapper], step: int) -> None:
    """The same random gradients on every optimizer's parameters (some entries exactly 0, whose
    sign is 0); at odd steps the first group's second parameter gets none."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(all_params(opts[0])):
        grad = torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) > 0.1)
        for opt in opts:
            q = all_params(opt)[i]
            q.grad = None if step % 2 and i == 1 else grad.to(q.dtype)


def assert_same(ours: ScheduleFreeWrapper, stock: ScheduleFreeWrapper) -> None:
    for p, q in zip(all_params(ours), all_params(stock), strict=True):
        assert torch.equal(p, q)
        assert ("z" in ours.state[p]) == ("z" in stock.state[q])
        if "z" in stock.state[q]:
            assert torch.equal(ours.state[p]["z"], stock.state[q]["z"])
    for g, h in zip(ours.param_groups, stock.param_groups, strict=True):
        assert (g["k"], g["weight_sum"], g["lr_max"]) == (h["k"], h["weight_sum"], h["lr_max"])


def train_steps(opts: list[ScheduleFreeWrapper], steps: range) -> None:
    for step in steps:
        set_grads(opts, step)
        for opt in opts:
            opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "settings",
    [{}, {"weight_decay_at_y": 0.1, "r": 0.5, "weight_lr_power": 1.0}],
    ids=["defaults", "decay-r-power"],
)
def test_steps_match_the_stock_wrapper_bit_for_bit(dtype, settings):
    params = initial_params(dtype)
    ours, stock = (
        wrap(ScheduleFreeSignSGD, params, **settings),
        wrap(ScheduleFreeWrapper, params, **settings),
    )
    for step in range(8):
        if step == 3:  # to the averaged point x and back to y, mid-run
            for opt in (ours, stock):
                opt.eval()
            assert_same(ours, stock)
            for opt in (ours, stock):
                opt.train()
        if step == 5:  # a learning rate changed mid-run: lr_max keeps the largest
            for opt in (ours, stock):
                opt.param_groups[0]["lr"] *= 3
                opt.param_groups[2]["lr"] /= 2
        train_steps([ours, stock], range(step, step + 1))
        assert_same(ours, stock)
    # the steps moved every parameter away from where it began
    for p, initial in zip(all_params(ours), [p for ps in params for p in ps], strict=True):
        assert not torch.equal(p, initial)


@pytest.mark.parametrize("first", [ScheduleFreeSignSGD, ScheduleFreeWrapper])
def test_a_checkpoint_of_either_resumes_in_the_other(first):
    # as read_training_state resumes: a new optimizer in train mode, its state dict loaded
    # through torch.save / torch.load, then the parameters copied in
    second = ScheduleFreeWrapper if first is ScheduleFreeSignSGD else ScheduleFreeSignSGD
    params = initial_params(torch.bfloat16)
    uninterrupted, before = wrap(second, params), wrap(first, params)
    train_steps([uninterrupted, before], range(4))
    buffer = io.BytesIO()
    torch.save(before.state_dict(), buffer)
    buffer.seek(0)
    after = wrap(second, params)
    after.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        for p, saved in zip(all_params(after), all_params(before), strict=True):
            p.copy_(saved)
    assert_same(after, uninterrupted)
    train_steps([uninterrupted, after], range(4, 8))
    assert_same(after, uninterrupted)


class SignSGDWithItsOwnStep(SignSGD):
    """A SignSGD whose step the wrapper would silently skip."""

    def step(self, closure=None):
        raise AssertionError("not reached")


@pytest.mark.parametrize("base", [torch.optim.SGD, SignSGDWithItsOwnStep])
def test_a_base_other_than_signsgd_is_refused(base):
    with pytest.raises(TypeError, match=f"got a base {base.__name__}; wrap other optimizers"):
        ScheduleFreeSignSGD(base([torch.nn.Parameter(torch.zeros(2))], lr=0.1))


def test_a_step_outside_train_mode_is_refused():
    opt = wrap(ScheduleFreeSignSGD, initial_params(torch.float32))
    opt.eval()
    set_grads([opt], 0)
    with pytest.raises(RuntimeError, match="outside train mode"):
        opt.step()

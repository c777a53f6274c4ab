"""Hypergradients across processes: 2 CPU processes, gloo.

The hypergradient is a sum over the whole model of ``<g, du/dh>``; these tests check it is formed
over the whole model whatever the layout:

* FSDP2 (raw ``fully_shard`` on ``init_device_mesh("cpu", (2,))``, uneven and empty shards): each
  rank sees shards, the dot products are completed by the base class's one all-reduce per step,
  and every level's hyperparameters and the parameters follow a single-process run;
* ``global_reduce="world"`` with the parameters split between ranks by hand (what DeepSpeed ZeRO
  does), including steps on which one rank has no gradient at all and still joins the collective;
* DDP: gradients are already averaged, the optimizer makes no collective, and the trajectory is
  the single-process one.

Every worker computes the single-process reference itself on the full batch (fp64, so that the
comparison measures the algorithm, not rounding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_helpers import CountCollectives, process_group, shard_fsdp2, spawn

from hf_tuningfree.optim import create_optimizer

STEPS = 8
#: fp64, sharded or split against one process; measured: the hyperparameters equal (0.0 over
#: 672 values), the parameters 6.7e-15 relative, 1.1e-16 absolute
REL = 1e-12
P_RTOL, P_ATOL = 1e-13, 1e-14
CONFIGS = [
    ("hyper_sgd", {"learn": "lr+momentum", "height": 3, "hyper_optimizer": "adam/sgd/adam",
                   "hyper_lr": (0.05, 1.0, 0.02), "weight_decay": 0.01}),
    ("hyper_adam", {"learn": "lr+beta1+beta2", "height": 2, "weight_decay": 0.01,
                    "per_tensor": False}),
    ("hyper_rmsprop", {"learn": "lr+decay", "height": 2}),  # (AdaGrad's dots are the same kind)
    # one tower per tensor: each tensor's dot summed over the shards, entry by entry
    ("hyper_adam", {"per_tensor": True, "height": 2, "weight_decay": 0.01}),
]  # fmt: skip


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 16x8, 16, 3x16, 3 (uneven shards), 1x3, 1 (empty on rank 1 under FSDP2)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3), torch.nn.Tanh(),
        torch.nn.Linear(3, 1),
    ).double()  # fmt: skip


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 32, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(STEPS, 32, 1, generator=gen, dtype=torch.float64)
    return x, y


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _groups(params_named, wd):
    named = list(params_named)
    return [
        {"params": [p for n, p in named if p.dim() > 1], "weight_decay": wd},
        {"params": [p for n, p in named if p.dim() <= 1], "weight_decay": 0.0},
    ]


def _build(name, kwargs, named, **extra):
    kwargs = dict(kwargs)
    wd = kwargs.pop("weight_decay", 0.0)
    return create_optimizer(name, _groups(named, wd), implementation="loop", **kwargs, **extra)


def _hyper(stats, opt=None):
    """The tower's values; with ``per_tensor`` every tensor's (``key/i``) besides the median."""
    out = {k: v for k, v in stats.items() if k.startswith("hyper/")}
    if opt is not None and opt.per_tensor:
        for key, value in opt.global_state.items():
            if key.startswith("hyper/level") and value.dim() == 1 and key.count("/") == 2:
                out.update({f"{key}/{i}": v for i, v in enumerate(value.tolist())})
    return out


def _reference(name, kwargs, skip=lambda t, n: False):
    """Single process, full batch: the hyper values after every step and the final parameters."""
    model = _model()
    opt = _build(name, kwargs, model.named_parameters())
    x, y = _data()
    history = []
    for t in range(STEPS):
        opt.zero_grad()
        _loss(model, x[t], y[t]).backward()
        for n, p in model.named_parameters():
            if skip(t, n):
                p.grad = None
        opt.step()
        history.append(_hyper(opt.stats(), opt))
    lr0 = kwargs.get("lr", None)
    assert history[-1]["hyper/level0/lr"] != lr0
    return history, {n: p.detach().clone() for n, p in model.named_parameters()}


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert abs(a[k] - b[k]) <= REL * abs(b[k]) + 1e-300, f"{what} {k}: {a[k]!r} vs {b[k]!r}"


def _follow(model, opt, x, y, half, ref_hist, collectives: int, what: str) -> None:
    """``STEPS`` steps on this rank's ``half`` of each batch, each making ``collectives``
    all-reduces; the hyperparameters after each step equal the reference's."""
    for t in range(STEPS):
        opt.zero_grad()
        _loss(model, x[t][half], y[t][half]).backward()
        with CountCollectives() as c:
            opt.step()
        assert c.count == collectives, f"{what}: {c.count} collectives in one step"
        _close(_hyper(opt.stats(), opt), ref_hist[t], f"{what} step {t}")


# ---------------------------------------------------------------------- FSDP2 and ZeRO-like
def _worker_sharded(rank: int, world: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    x, y = _data()
    half = slice(rank * 16, (rank + 1) * 16)
    with process_group(rank, world, port):
        for name, kwargs in CONFIGS:
            # --- FSDP2: shards of every parameter, gradients averaged over the two half-batches
            ref_hist, ref_params = _reference(name, kwargs)
            mesh = init_device_mesh("cpu", (world,))
            model = shard_fsdp2(_model(), mesh)
            opt = _build(name, kwargs, model.named_parameters())
            _follow(model, opt, x, y, half, ref_hist, 1, f"FSDP2 {name}")
            for n, p in model.named_parameters():
                full = p.full_tensor().detach()
                torch.testing.assert_close(full, ref_params[n], rtol=P_RTOL, atol=P_ATOL)

            # --- parameters split between ranks by hand, global_reduce="world"; rank 1 owns
            # only "4.*" and has no gradient at all on steps 2 and 5
            def skip(t, n):
                return n.startswith("4.") and t in (2, 5)

            if kwargs.get("per_tensor"):  # 4 tensors here, 2 there: refused on every rank
                model = _model()
                named = list(model.named_parameters())
                mine = [(n, p) for n, p in named if n.startswith("4.") == (rank == 1)]
                opt = _build(name, kwargs, mine, global_reduce="world")
                _loss(model, x[0], y[0]).backward()
                try:
                    opt.step()
                except ValueError as exc:
                    assert "the ranks hold 2 to 4 tensors; allowed: the same tensors" in str(exc)
                else:
                    raise AssertionError("per_tensor over unequal hand-split tensors was taken")
                untouched = zip(model.parameters(), _model().parameters(), strict=True)
                assert all(torch.equal(p, q) for p, q in untouched)
                continue

            ref_hist, ref_params = _reference(name, kwargs, skip)
            model = _model()
            named = list(model.named_parameters())
            mine = [(n, p) for n, p in named if n.startswith("4.") == (rank == 1)]
            mine_names = {n for n, _ in mine}
            opt = _build(name, kwargs, mine, global_reduce="world")
            for t in range(STEPS):
                opt.zero_grad()
                model.zero_grad()
                _loss(model, x[t], y[t]).backward()
                for n, p in named:
                    if skip(t, n) or n not in mine_names:
                        p.grad = None
                opt.step()
                for n, p in named:  # owners broadcast their updated parameters
                    dist.broadcast(p.data, src=1 if n.startswith("4.") else 0)
                _close(_hyper(opt.stats()), ref_hist[t], f"world {name} step {t} rank {rank}")
            for n, p in named:
                torch.testing.assert_close(p.detach(), ref_params[n], rtol=P_RTOL, atol=P_ATOL)


def test_fsdp2_and_world_reduction_follow_one_process():
    spawn(_worker_sharded)


# ---------------------------------------------------------------------- DDP
def _worker_ddp(rank: int, world: int, port: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _data()
    half = slice(rank * 16, (rank + 1) * 16)
    with process_group(rank, world, port):
        for name, kwargs in CONFIGS:
            ref_hist, ref_params = _reference(name, kwargs)
            model = DDP(_model())
            opt = _build(name, kwargs, model.module.named_parameters())
            # DDP gradients are already averaged: no optimizer collective
            _follow(model, opt, x, y, half, ref_hist, 0, f"DDP {name}")
            for n, p in model.module.named_parameters():
                torch.testing.assert_close(p.detach(), ref_params[n], rtol=P_RTOL, atol=P_ATOL)


def test_ddp_follows_one_process():
    spawn(_worker_ddp)

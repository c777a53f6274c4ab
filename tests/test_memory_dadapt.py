"""The memory options of the D-Adaptation family, Prodigy and schedule-free Prodigy (issue 17).

* ``implicit_zero_x0`` (Prodigy, prodigy_sf; on by default): a tensor that is all zero when its
  state is created stores no ``x0``; every number is the same as with the stored copy (compared
  bit for bit with ``implicit_zero_x0=False``, C and torch paths, fused and two-pass forms),
  the zero check is one batched host read at state creation, a resume continues bit-exactly and
  FSDP2 decides it for the whole tensor (the same state keys on every rank).
* ``betas[0] == 0`` without a first-moment buffer (DAdaptAdam, Prodigy).
* ``slice_p`` (subsampled statistics).

State bytes are counted here from the state tensors' ``nbytes``.
"""

from __future__ import annotations

import io

import pytest
import torch
from dist_helpers import CountCollectives, process_group, shard_fsdp2, spawn

from hf_tuningfree.optim import (
    DAdaptAdam,
    DAdaptSGD,
    Prodigy,
    ProdigyScheduleFree,
    _native,
)
from hf_tuningfree.optim import prodigy as prodigy_module
from hf_tuningfree.optim.dadapt import passes as dadapt_passes
from hf_tuningfree.optim.reference import dadapt as dadapt_reference

#: shapes: one unpacked nonzero, one unpacked zero (LoRA's B), small ones packed together (a
#: zero among nonzero ones, so that the packed x0 holds a zero block)
SHAPES = [(150, 120), (120, 150), (7,), (5, 3), (9,)]
ZERO = {1, 3}
STEPS = 12
HAS_C = _native.load() is not None


def _params(dtype=torch.float64, shapes=SHAPES, zero=ZERO):
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(
            torch.zeros(s, dtype=dtype) if i in zero else torch.randn(s, generator=gen).to(dtype)
        )
        for i, s in enumerate(shapes)
    ]


def _grads(params, t):
    """The gradient of ``sum (x - target)^2`` plus noise (a fixed target, so that ``d`` grows)."""
    gen = torch.Generator().manual_seed(7)
    targets = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    gen = torch.Generator().manual_seed(100 + t)
    return [
        (
            2.0 * (p.detach().double() - tg)
            + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        ).to(p.dtype)
        for p, tg in zip(params, targets, strict=True)
    ]


def _run(cls, steps=STEPS, params=None, fuse=True, opt_state=None, start=0, **kw):
    params = _params() if params is None else params
    # lr 1: the paper's multiplier, the setting these runs were measured at (DAdaptAdam's
    # default is 0.5)
    opt = cls(params, **{"d0": 1e-5, "d0_rel": 0.0, "lr": 1.0, **kw})
    opt.FUSE = fuse and cls is not ProdigyScheduleFree
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    ds = []
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = g
        opt.step()
        ds.append(opt.stats()["d"])
    return params, ds, opt


def _state_bytes(opt) -> int:
    return sum(
        v.nbytes for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
    )


def _spy_kernels(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = _native.dadapt_kernel

    def spy(*args, **kwargs):
        calls.append(args[0])
        real(*args, **kwargs)

    monkeypatch.setattr(_native, "dadapt_kernel", spy)
    return calls


# ====================================================================== implicit x0
PATHS = [
    pytest.param(Prodigy, "auto", True, id="prodigy-C-fused"),
    pytest.param(Prodigy, "auto", False, id="prodigy-C-two-pass"),
    pytest.param(Prodigy, "loop", False, id="prodigy-loop"),
    pytest.param(ProdigyScheduleFree, "auto", False, id="prodigy_sf-auto"),
    pytest.param(ProdigyScheduleFree, "loop", False, id="prodigy_sf-loop"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(("cls", "impl", "fuse"), PATHS)
def test_implicit_x0_is_bit_identical_to_the_stored_copy(cls, impl, fuse, dtype, monkeypatch):
    calls = _spy_kernels(monkeypatch)
    kw = {"implementation": impl, "weight_decay": 0.01, "decoupled_weight_decay": False}
    implicit, ds_i, opt_i = _run(cls, params=_params(dtype), fuse=fuse, **kw)
    n_implicit = len(calls)
    stored, ds_s, opt_s = _run(cls, params=_params(dtype), fuse=fuse, implicit_zero_x0=False, **kw)
    for i, (a, b) in enumerate(zip(implicit, stored, strict=True)):
        assert torch.equal(a, b), f"parameter {i} differs"
        assert "x0" in opt_s.state[b]
        assert ("x0" in opt_i.state[a]) == (i not in ZERO), f"parameter {i}: x0 stored?"
    assert ds_i == ds_s and ds_i[-1] > 5 * ds_i[0], (ds_i[0], ds_i[-1])
    assert opt_i.stats()["numerator"] == opt_s.stats()["numerator"] != 0.0
    saved = sum(p.numel() for i, p in enumerate(implicit) if i in ZERO) * implicit[0].itemsize
    assert _state_bytes(opt_s) - _state_bytes(opt_i) == saved
    # the path that ran: the C kernels (cls with C kernels, "auto") or none
    uses_c = HAS_C and impl == "auto" and cls is Prodigy
    kinds = {c.rsplit("_", 1)[1] for c in calls[:n_implicit]}
    assert kinds == ({"sq", "fused"} if fuse else {"stats", "update"}) if uses_c else not kinds


def test_implicit_x0_on_the_compiled_path_matches_the_loop(monkeypatch):
    """``"compiled"`` through torch.compile (the C library made unavailable): the kernel of a
    tensor without ``x0`` is compiled with ``x0`` put back as None (``_compiled_without``)."""
    monkeypatch.setenv(_native.NATIVE_ENV_VAR, "0")
    shapes, zero = [(130, 130), (140, 130), (5,)], {1}
    out = {}
    for impl in ("loop", "compiled"):
        params = _params(torch.float32, shapes, zero)
        out[impl] = _run(Prodigy, steps=4, params=params, implementation=impl)
    (pl, dl, _), (pc, dc, oc) = out["loop"], out["compiled"]
    assert "x0" not in oc.state[pc[1]] and "x0" in oc.state[pc[0]]
    assert any(k[1] == (3,) for k in dadapt_passes._VARIANTS), "no x0-less variant was compiled"
    rel = max(((a - b).abs() / (1 + a.abs())).max().item() for a, b in zip(pl, pc, strict=True))
    # fp32 compiled against the loop: measured 3.6e-9, d 0
    assert rel <= 1e-7 and abs(dl[-1] - dc[-1]) <= 1e-7 * dl[-1], (rel, dl[-1], dc[-1])


def test_the_zero_check_is_one_host_read_at_state_creation(monkeypatch):
    reads: list[int] = []
    real = dadapt_passes._host_flags

    def counting(flags):
        reads.append(len(flags))
        return real(flags)

    monkeypatch.setattr(prodigy_module, "_host_flags", counting)
    params = _params()
    opt = Prodigy(params)
    per_step = []
    for t in range(3):
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = g
        opt.step()
        per_step.append(list(reads))
        reads.clear()
    # one read of all five tensors' flags at the first step, none afterwards
    assert per_step == [[len(SHAPES)], [], []]
    # a parameter that gets its first gradient later: one read for it alone, at that step
    late = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt.add_param_group({"params": [late]})
    late.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    assert reads == [1] and "x0" not in opt.state[late]
    reads.clear()
    _run(Prodigy, steps=2, implicit_zero_x0=False)
    assert reads == [], "implicit_zero_x0=False reads nothing"


@pytest.mark.parametrize("cls", [Prodigy, ProdigyScheduleFree])
def test_resume_without_x0_continues_bit_exactly(cls):
    params, _, opt = _run(cls, steps=4)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    saved = ckpt["opt"]["state"]
    assert sorted(i for i, st in saved.items() if "x0" not in st) == sorted(ZERO)
    # the original goes on ...
    for t in range(4, 8):
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = g
        opt.step()
    # ... and a fresh optimizer loaded from the checkpoint makes the same steps
    fresh = [torch.nn.Parameter(x.clone()) for x in ckpt["params"]]
    resumed, ds, opt_r = _run(cls, steps=4, params=fresh, opt_state=ckpt["opt"], start=4)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed, strict=True))
    assert ds[-1] == opt.stats()["d"]
    assert all(("x0" in opt_r.state[p]) == (i not in ZERO) for i, p in enumerate(resumed))


def test_a_zero_tensor_that_moved_keeps_its_implicit_x0():
    """The check is made once, at state creation: a LoRA B that has moved away from 0 keeps its
    implicit x0 = 0 (its distance from the start is its own value)."""
    params, _, opt = _run(Prodigy, steps=3)
    assert params[1].detach().abs().max() > 0 and "x0" not in opt.state[params[1]]


def test_implicit_zero_x0_must_be_a_bool():
    # check_bool's TypeError, as for every boolean flag of the package
    with pytest.raises(TypeError, match="implicit_zero_x0 must be True or False, got int 1"):
        Prodigy(_params(), implicit_zero_x0=1)
    with pytest.raises(TypeError, match="implicit_zero_x0 must be True or False"):
        ProdigyScheduleFree(_params(), implicit_zero_x0="yes")


# ---------------------------------------------------------------------- FSDP2 on gloo
def _fsdp2_x0_worker(rank: int, world: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4), torch.nn.Tanh(),
            torch.nn.Linear(4, 1),
        )  # fmt: skip
        with torch.no_grad():  # a LoRA-B-like zero layer (uneven shards: 4 rows on 2 ranks)
            m[2].weight.zero_()
        return m

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)

    def train(m, opt, xb, yb, count=False):
        for _ in range(6):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(xb), yb).backward()
            with CountCollectives() as counter:
                opt.step()
            if count:
                assert counter.count == 1, f"{counter.count} collectives in a step"
        return opt.stats()["d"]

    with process_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        for cls in (Prodigy, ProdigyScheduleFree):
            ref = model()
            ref_opt = cls(ref.parameters(), d0=1e-3)
            ref_d = train(ref, ref_opt, x, y)
            sharded = shard_fsdp2(model(), mesh)
            opt = cls(sharded.parameters(), d0=1e-3)
            local = slice(rank * 16, (rank + 1) * 16)
            d = train(sharded, opt, x[local], y[local], count=True)
            names = [n for n, _ in sharded.named_parameters()]
            keys = [sorted(opt.state[p]) for p in sharded.parameters()]
            # the zero layer has no x0 on EITHER rank (rank 1's shard of "4.weight" is empty:
            # decided for the whole tensor, it keeps its x0)
            for n, k in zip(names, keys, strict=True):
                assert ("x0" in k) == (n != "2.weight"), (cls.__name__, rank, n, k)
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, keys)
            assert gathered[0] == gathered[1], f"{cls.__name__}: state keys differ by rank"
            # fp32: measured d 1.2e-7, parameters 3.9e-7 (relative)
            assert abs(d - ref_d) <= 1e-5 * ref_d, (cls.__name__, d, ref_d)
            for p, q in zip(sharded.parameters(), ref.parameters(), strict=True):
                diff = (p.full_tensor() - q.detach()).abs().max().item()
                assert diff <= 1e-5 * q.detach().abs().max().item(), (cls.__name__, diff)
            # a resume from the sharded state dict continues identically on both ranks
            sd = opt.state_dict()
            again = cls(sharded.parameters(), d0=1e-3)
            again.load_state_dict(sd)
            assert [sorted(again.state[p]) for p in sharded.parameters()] == keys

        # beta1 = 0 under FSDP2: no exp_avg on any rank, the same run as one process
        for cls in (DAdaptAdam, Prodigy):
            ref = model()
            ref_d = train(ref, cls(ref.parameters(), d0=1e-3, betas=(0.0, 0.99)), x, y)
            sharded = shard_fsdp2(model(), mesh)
            opt = cls(sharded.parameters(), d0=1e-3, betas=(0.0, 0.99))
            local = slice(rank * 16, (rank + 1) * 16)
            d = train(sharded, opt, x[local], y[local], count=True)
            assert all("exp_avg" not in opt.state[p] for p in sharded.parameters())
            # fp32: measured d 1.2e-7, parameters 3.9e-7 (relative)
            assert abs(d - ref_d) <= 1e-5 * ref_d, (cls.__name__, d, ref_d)
            for p, q in zip(sharded.parameters(), ref.parameters(), strict=True):
                diff = (p.full_tensor() - q.detach()).abs().max().item()
                assert diff <= 1e-5 * q.detach().abs().max().item(), (cls.__name__, diff)

        # slice_p under FSDP2: s (and x0) on the kept elements of each rank-local shard, one
        # collective per step, the same d on both ranks, close to the unsharded run's (whose
        # kept set differs: each shard's kept elements follow its own offset)
        for cls in (DAdaptSGD, DAdaptAdam, Prodigy, ProdigyScheduleFree):
            ref = model()
            ref_d = train(ref, cls(ref.parameters(), d0=1e-3, slice_p=2), x, y)
            sharded = shard_fsdp2(model(), mesh)
            opt = cls(sharded.parameters(), d0=1e-3, slice_p=2)
            local = slice(rank * 16, (rank + 1) * 16)
            d = train(sharded, opt, x[local], y[local], count=True)
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, d)
            assert gathered[0] == gathered[1], f"{cls.__name__}: d differs by rank"
            assert abs(d / ref_d - 1) <= 0.25, (cls.__name__, d, ref_d)
            for p in sharded.parameters():
                n = p.to_local().numel()
                assert opt.state[p]["s"].shape == ((n + 1) // 2,), (cls.__name__, rank)
            again = cls(sharded.parameters(), d0=1e-3, slice_p=2)
            again.load_state_dict(opt.state_dict())
            assert all(
                torch.equal(again.state[p]["s"], opt.state[p]["s"]) for p in sharded.parameters()
            )


def test_fsdp2_implicit_x0_beta1_zero_and_slice_p():
    spawn(_fsdp2_x0_worker)


# ====================================================================== beta1 = 0
#: the Adam forms with a first moment, on each path
ADAM_PATHS = [
    *PATHS[:3],
    pytest.param(DAdaptAdam, "auto", True, id="dadapt_adam-C-fused"),
    pytest.param(DAdaptAdam, "auto", False, id="dadapt_adam-C-two-pass"),
    pytest.param(DAdaptAdam, "loop", False, id="dadapt_adam-loop"),
]


def _reference_problem():
    from test_dadapt import _adam_groups, _make_problem

    return _make_problem(), _adam_groups(False)


@pytest.mark.parametrize("impl", ["native", "loop"], ids=["C", "loop"])
@pytest.mark.parametrize("name", ["dadapt_adam", "prodigy"])
def test_beta1_zero_has_no_first_moment_and_follows_the_reference(name, impl, monkeypatch):
    """``betas[0] = 0``: no ``exp_avg`` is allocated and the run follows the fp64 per-element
    reference (``optim.reference.dadapt``: its ``m = 0 m + 1 d g`` is ``d g`` exactly) at every
    step, on the C kernels (``"native"``) and the per-tensor loop."""
    from test_dadapt import D0, STEPS, _compare, _convention, _run_ours

    if impl == "native" and not HAS_C:
        pytest.skip("no C compiler")
    calls = _spy_kernels(monkeypatch)
    prob, hp = _reference_problem()
    betas = (0.0, 0.99)
    model = {"d0": D0, "d0_rel": 0.0, "betas": betas}
    if name == "prodigy":
        expected = dadapt_reference.prodigy(
            *_convention(prob), hp, **model, use_bias_correction=True
        )
        cls = Prodigy
    else:
        expected = dadapt_reference.adam(*_convention(prob), hp, **model, use_bias_correction=True)
        cls = DAdaptAdam
    params, ds, opt = _run_ours(cls, prob, hp, model, impl=impl)
    worst, worst_d = _compare(params, expected[0], ds, expected[1])
    print(f"{name} {impl}: max |x - x_ref| {worst:.1e}, d rel {worst_d:.1e}, d {ds[-1]:.3g}")
    assert worst <= 1e-12 and worst_d <= 1e-12, (worst, worst_d)
    assert ds[-1] > 10 * D0
    assert all("exp_avg" not in st for st in opt.state.values()) and len(opt.state) == 5
    if impl == "native":  # the C kernels ran, fused (one process)
        assert {c.rsplit("_", 1)[1] for c in calls} == {"sq", "fused"}, set(calls)
        assert len(calls) == 4 * STEPS  # 2 groups x (guard + fused update)


@pytest.mark.parametrize(("cls", "impl", "fuse"), ADAM_PATHS)
def test_beta1_zero_equals_the_zero_momentum_buffer(cls, impl, fuse, monkeypatch):
    """Today's beta1 = 0 with a buffer (``m + 1 (d g - m)``, the update of a buffer that holds
    the last step) against no buffer (``d g``): equal to rounding (fp64; ``m + (x - m)`` is
    not always ``x`` in floating point, so not bit for bit)."""
    stored, ds_b, _ = _run(cls, params=_params(), fuse=fuse, betas=(0.0, 0.99), implementation=impl)
    # the buffered form: a beta1 of 1e-300 keeps exp_avg, and 1 - 1e-300 == 1.0 in fp64
    buffered, ds_m, opt_m = _run(
        cls, params=_params(), fuse=fuse, betas=(1e-300, 0.99), implementation=impl
    )
    assert all("exp_avg" in opt_m.state[p] for p in buffered)
    rel = max(
        ((a - b).abs() / b.abs().max()).max().item() for a, b in zip(stored, buffered, strict=True)
    )
    d_rel = max(abs(a - b) / b for a, b in zip(ds_b, ds_m, strict=True))
    print(f"no buffer vs buffer: params {rel:.1e}, d {d_rel:.1e}")
    assert rel <= 1e-13 and d_rel <= 1e-13, (rel, d_rel)
    assert ds_b[-1] > 5 * ds_b[0]


@pytest.mark.parametrize(("cls", "impl", "fuse"), ADAM_PATHS)
def test_switching_beta1_on_and_off(cls, impl, fuse):
    """Off -> on: ``exp_avg`` is created as this step's ``d g``, so that step moves as a beta1
    = 0 step (``m_{k+1} = m_k + (1 - beta1)(d g - m_k) = d g``) and the momentum builds from
    there; on -> off: the buffer is dropped. Checked against runs that never switched (bias
    correction off: its ``1 - beta1^(k+1)`` would change the step size at the switch)."""
    kw = {"implementation": impl, "betas": (0.0, 0.99), "use_bias_correction": False}
    a, _, opt = _run(cls, steps=4, params=_params(), fuse=fuse, **kw)
    b, _, ref = _run(cls, steps=5, params=_params(), fuse=fuse, **kw)
    for group in opt.param_groups:
        group["betas"] = (0.9, 0.99)
    for p, g in zip(a, _grads(a, 4), strict=True):
        p.grad = g
    opt.step()
    # the switching step is the beta1 = 0 step, bit for bit (m_k + c (d g - m_k) with m_k = d g
    # is exactly d g)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all("exp_avg" in opt.state[p] for p in a)
    # m_{k+1} = d g of that step, for every tensor
    assert all(opt.state[p]["exp_avg"].abs().max() > 0 for p in a)
    # then it is momentum: the next step differs from the beta1 = 0 run's
    for x in (a, b):
        for p, g in zip(x, _grads(x, 5), strict=True):
            p.grad = g
    opt.step()
    ref.step()
    assert not torch.equal(a[0], b[0])
    # on -> off: the buffers go, and the steps are beta1 = 0 steps again
    before = sum(st["exp_avg"].nbytes for st in opt.state.values())
    for group in opt.param_groups:
        group["betas"] = (0.0, 0.99)
    opt.step()
    assert all("exp_avg" not in opt.state[p] for p in a)
    assert before == sum(p.nbytes for p in a)


@pytest.mark.parametrize("cls", [Prodigy, DAdaptAdam])
def test_beta1_zero_resume_is_bit_exact(cls):
    kw = {"betas": (0.0, 0.99)}
    params, _, opt = _run(cls, steps=4, **kw)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert all("exp_avg" not in st for st in ckpt["opt"]["state"].values())
    for t in range(4, 8):
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = g
        opt.step()
    fresh = [torch.nn.Parameter(x.clone()) for x in ckpt["params"]]
    resumed, ds, _ = _run(cls, steps=4, params=fresh, opt_state=ckpt["opt"], start=4, **kw)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed, strict=True))
    assert ds[-1] == opt.stats()["d"]


@pytest.mark.parametrize("cls", [Prodigy, DAdaptAdam])
def test_beta1_zero_on_the_compiled_path_matches_the_loop(cls, monkeypatch):
    """torch.compile (C library unavailable) with ``exp_avg`` None in every call."""
    monkeypatch.setenv(_native.NATIVE_ENV_VAR, "0")
    shapes, zero = [(130, 130), (5,), (3, 2)], set()
    out = {}
    for impl in ("loop", "compiled"):
        params = _params(torch.float32, shapes, zero)
        out[impl] = _run(cls, steps=6, params=params, implementation=impl, betas=(0.0, 0.99))
    (pl, dl, _), (pc, dc, oc) = out["loop"], out["compiled"]
    assert all("exp_avg" not in st for st in oc.state.values())
    rel = max(((a - b).abs() / (1 + a.abs())).max().item() for a, b in zip(pl, pc, strict=True))
    # fp32 compiled against the loop: measured 3.6e-9, d 0
    assert rel <= 1e-7 and abs(dl[-1] - dc[-1]) <= 1e-7 * dl[-1], (rel, dl[-1], dc[-1])
    assert dl[-1] > 2 * dl[0]


# ====================================================================== slice_p
K = 3
#: 30 elements (kept: 0, 3, ..., 27), 7 (0, 3, 6), 2 (n < k: element 0 only)
SLICE_SHAPES = [(6, 5), (7,), (2,)]
SLICE_STEPS = 20
WD = 0.05


def _slice_problem():
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SLICE_SHAPES]
    drift = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SLICE_SHAPES]
    grads = [
        [a + 0.3 * torch.randn(a.shape, generator=gen, dtype=torch.float64) for a in drift]
        for _ in range(SLICE_STEPS)
    ]
    return init, grads


def _slice_run(cls, impl, k=K, **kw):
    init, grads = _slice_problem()
    params = [torch.nn.Parameter(x.clone()) for x in init]
    kw = {"lr": 1.0, **kw}  # the reference's group lr (DAdaptAdam's default is 0.5)
    opt = cls(params, implementation=impl, slice_p=k, d0=1e-4, d0_rel=0.0, **kw)
    ds = []
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        ds.append(opt.stats()["d"])
    return params, ds, opt


def _slice_reference(reference, group, **model_wide):
    """``reference`` (a ``*_with_s`` of ``optim.reference.dadapt``) on the slice problem: one
    group with ``lr = 1`` and coupled weight decay WD, ``d0 = 1e-4``, ``slice_p = K``; returns
    ``(x, ds, s)`` of that group's tensors."""
    init, grads = _slice_problem()
    stream = [[[g.flatten().tolist() for g in gs]] for gs in grads]
    hp = {"lr": 1.0, "weight_decay": WD, "decoupled_weight_decay": False, **group}
    x, ds, s = reference(
        [[t.flatten().tolist() for t in init]],
        lambda t, _x: stream[t],
        SLICE_STEPS,
        [hp],
        d0=1e-4,
        slice_p=K,
        **model_wide,
    )
    return x[0], ds, s[0]


#: the Adam forms: bias correction on (the optimizers' default), beta2 = 0.99
ADAM_SLICE = {"betas": (0.9, 0.99), "use_bias_correction": True}

SLICED = [
    pytest.param(
        DAdaptSGD,
        {"weight_decay": WD},
        lambda: _slice_reference(dadapt_reference.sgd_with_s, {"momentum": 0.0}),
        id="sgd",
    ),
    pytest.param(
        DAdaptSGD,
        {"weight_decay": WD, "momentum": 0.9},
        lambda: _slice_reference(dadapt_reference.sgd_with_s, {"momentum": 0.9}),
        id="sgd_momentum",
    ),
    pytest.param(
        DAdaptAdam,
        {"weight_decay": WD, "decoupled_weight_decay": False, "betas": (0.9, 0.99)},
        lambda: _slice_reference(dadapt_reference.adam_with_s, {"eps": 1e-8}, **ADAM_SLICE),
        id="adam",
    ),
    pytest.param(
        Prodigy,
        {"weight_decay": WD, "decoupled_weight_decay": False, "betas": (0.9, 0.99)},
        lambda: _slice_reference(dadapt_reference.prodigy_with_s, {"eps": 1e-8}, **ADAM_SLICE),
        id="prodigy",
    ),
]


@pytest.mark.parametrize(
    ("impl", "fuse"),
    [("native", True), ("native", False), ("loop", False)],
    ids=["C-fused", "C-two-pass", "loop"],
)
@pytest.mark.parametrize(("cls", "kw", "reference"), SLICED)
def test_slice_p_follows_the_per_element_reference(cls, kw, reference, impl, fuse, monkeypatch):
    """fp64, 20 steps, coupled weight decay (it enters the kept g'), a tensor with n < k: the
    parameters, d and the stored s against a loop over the kept indices. On the C path, fused:
    one ``*_fused_sliced`` sweep per group (the kept elements' sums and s, then the full update
    of the block); two-pass (the sharded form): the full update in C with s left out (a NULL
    stream) and the 1/k statistics and s in torch."""
    if impl == "native" and not HAS_C:
        pytest.skip("no C compiler")
    calls = _spy_kernels(monkeypatch)
    monkeypatch.setattr(cls, "FUSE", fuse)
    params, ds, opt = _slice_run(cls, impl, **kw)
    x_ref, ds_ref, s_ref = reference()
    worst = max(
        abs(a - b) / (1 + abs(b))
        for p, xr in zip(params, x_ref, strict=True)
        for a, b in zip(p.detach().flatten().tolist(), xr, strict=True)
    )
    d_rel = max(abs(a - b) / b for a, b in zip(ds, ds_ref, strict=True))
    s_rel = max(
        abs(a - b) / (1e-300 + max(abs(u) for si in s_ref for u in si))
        for p, sr in zip(params, s_ref, strict=True)
        for a, b in zip(opt.state[p]["s"].tolist(), sr, strict=True)
    )
    print(f"{cls.__name__} {impl}: x {worst:.1e}, d {d_rel:.1e}, s {s_rel:.1e}, d {ds[-1]:.3g}")
    assert worst <= 1e-12 and d_rel <= 1e-12 and s_rel <= 1e-12, (worst, d_rel, s_rel)
    assert ds[-1] > 20 * ds[0], "d did not grow: the estimate would not be tested"
    assert [opt.state[p]["s"].shape[0] for p in params] == [10, 3, 1]
    if cls is Prodigy:
        assert [opt.state[p]["x0"].tolist() for p in params] == [
            x.flatten()[::K].tolist() for x in _slice_problem()[0]
        ]
    kinds = set(calls)
    last = "_fused_sliced" if fuse else "_update"
    if impl == "native":  # the full ||g||^2 (guard) and the update in C
        assert kinds == {"dadapt_grad_sq", _kernel_prefix(cls, kw) + last}, kinds
    else:
        assert not kinds


def _kernel_prefix(cls, kw):
    if cls is DAdaptSGD:
        return "dadapt_sgd_momentum" if kw.get("momentum") else "dadapt_sgd"
    return "dadapt_adam" if cls is DAdaptAdam else "prodigy"


@pytest.mark.parametrize("cls", [DAdaptSGD, DAdaptAdam, Prodigy, ProdigyScheduleFree])
def test_slice_p_state_bytes_and_resume(cls):
    """The state with slice_p = 4: s (and Prodigy's x0) at 1/4 of the elements; a state-dict
    round trip continues bit-exactly; loading it into an optimizer built with slice_p = 1
    takes the saved slice_p with it (the state fits it)."""
    params, _, opt = _run(cls, steps=3, slice_p=4)
    n = sum(p.numel() for p in params)
    kept = sum(-(-p.numel() // 4) for p in params)
    full = {"exp_avg", "exp_avg_sq", "z"}
    expected = {
        DAdaptSGD: kept,
        DAdaptAdam: 2 * n + kept,
        Prodigy: 2 * n
        + kept
        + sum(-(-p.numel() // 4) for i, p in enumerate(params) if i not in ZERO),
        ProdigyScheduleFree: 2 * n
        + kept
        + sum(-(-p.numel() // 4) for i, p in enumerate(params) if i not in ZERO),
    }[cls]
    assert _state_bytes(opt) == 8 * expected, (_state_bytes(opt) / 8, expected)
    assert all(k in full or opt.state[p][k].dim() == 1 for p in params for k in opt.state[p])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    for t in range(3, 6):
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = g
        opt.step()
    fresh = [torch.nn.Parameter(x.clone()) for x in ckpt["params"]]
    resumed, ds, opt_r = _run(cls, steps=3, params=fresh, opt_state=ckpt["opt"], start=3)
    assert opt_r.param_groups[0]["slice_p"] == 4
    assert all(torch.equal(a, b) for a, b in zip(params, resumed, strict=True))
    assert ds[-1] == opt.stats()["d"]


def test_slice_p_state_that_does_not_fit_is_refused():
    _, _, opt = _run(Prodigy, steps=1, slice_p=4)
    sd = opt.state_dict()
    sd["state"][0]["s"] = torch.zeros(7, dtype=torch.float64)
    fresh = Prodigy(_params(), slice_p=4)
    with pytest.raises(ValueError, match=r"'s' has shape \[7\], expected \[4500\] \(slice_p=4"):
        fresh.load_state_dict(sd)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
@pytest.mark.parametrize("cls", [DAdaptSGD, DAdaptAdam, Prodigy, ProdigyScheduleFree])
def test_slice_p_is_validated(cls, value):
    with pytest.raises(ValueError, match=r"Invalid slice_p: .*allowed: an integer >= 1"):
        cls(_params(), slice_p=value)


def test_slice_p_is_model_wide():
    a, b = _params()[:2]
    with pytest.raises(ValueError, match="slice_p=2 in a param group differs from 4"):
        Prodigy([{"params": [a]}, {"params": [b], "slice_p": 2}], slice_p=4)


def test_slice_p_d_estimate_on_a_larger_model_stays_close():
    """The subsampled estimate against the full one on the 12-step problem (36k elements,
    k = 8): d within 10% (measured 0.4-3%), the state 1/8 for s and x0."""
    out = {}
    for k in (1, 8):
        _, ds, opt = _run(Prodigy, slice_p=k, implicit_zero_x0=False)
        out[k] = (ds[-1], _state_bytes(opt))
    (d1, b1), (d8, b8) = out[1], out[8]
    print(f"d full {d1:.4g}, slice_p=8 {d8:.4g} ({d8 / d1 - 1:+.2%}); bytes {b1} -> {b8}")
    assert abs(d8 / d1 - 1) <= 0.10
    n = sum(p.numel() for p in _params())
    assert b1 == 4 * 8 * n and b8 == 8 * (
        2 * n + 2 * sum(-(-s // 8) for s in (18000, 18000, 7, 15, 9))
    )


@pytest.mark.skipif(not HAS_C, reason="no C compiler")
@pytest.mark.parametrize("k", [3, 5, 8192])
@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        pytest.param(DAdaptSGD, {"momentum": 0.9}, id="sgd_momentum"),
        pytest.param(DAdaptAdam, {}, id="adam"),
        pytest.param(DAdaptAdam, {"betas": (0.0, 0.99)}, id="adam_beta1_0"),
        pytest.param(Prodigy, {}, id="prodigy"),
        pytest.param(Prodigy, {"betas": (0.0, 0.99)}, id="prodigy_beta1_0"),
    ],
)
def test_fused_sliced_kernels_equal_the_two_pass_form(cls, kw, k, monkeypatch):
    """Tensors of several C blocks (18000 elements, BLOCK = 8192, so kept elements straddle the
    block boundaries for k = 3, 5), a zero tensor (Prodigy: no x0) and small ones: the fused
    sliced sweep against the two-pass form (C update, torch statistics), fp64."""
    calls = _spy_kernels(monkeypatch)
    runs = {}
    for fuse in (True, False):
        weights = {"weight_decay": 0.01, "decoupled_weight_decay": False}
        runs[fuse] = _run(cls, params=_params(), fuse=fuse, slice_p=k, **weights, **kw)
    (pf, df, of), (pt, dt, ot) = runs[True], runs[False]
    rel = max(((a - b).abs() / b.abs().max()).max().item() for a, b in zip(pf, pt, strict=True))
    d_rel = max(abs(a - b) / b for a, b in zip(df, dt, strict=True))
    s_rel = max(
        ((of.state[a]["s"] - ot.state[b]["s"]).abs().max() / ot.state[b]["s"].abs().max()).item()
        for a, b in zip(pf, pt, strict=True)
    )
    assert rel <= 1e-13 and d_rel <= 1e-13 and s_rel <= 1e-13, (rel, d_rel, s_rel)
    assert df[-1] > 2 * df[0]
    assert any(c.endswith("_fused_sliced") for c in calls)


def test_slice_p_state_changed_by_hand_is_refused_at_the_step():
    params, _, opt = _run(Prodigy, steps=1, slice_p=4)
    opt.state[params[0]]["s"] = torch.zeros(9, dtype=torch.float64)
    with pytest.raises(
        RuntimeError, match=r"params'\]\[0\].*'s' has shape \[9\], expected \[4500\]"
    ):
        opt.step()


@pytest.mark.skipif(not HAS_C, reason="no C compiler")
def test_sliced_kernels_check_the_sliced_streams():
    """The C entry point itself refuses a sliced stream of the wrong size and a stride that
    does not belong to the kernel (the stride the C code reads is the checked one)."""
    x, g, v = (torch.zeros(10, dtype=torch.float64) for _ in range(3))
    coef = torch.zeros(8, dtype=torch.float64)
    ok = torch.ones((), dtype=torch.bool)
    out = torch.zeros(2, dtype=torch.float64)
    args = {"maximize": False, "coupled": False, "ok": ok, "out": out}
    streams = [[x], [g], [None], [v], [torch.zeros(4, dtype=torch.float64)]]
    _native.dadapt_kernel("dadapt_adam_fused_sliced", streams, coef, stride=3, **args)
    with pytest.raises(ValueError, match=r"stream 4 holds a tensor that is not .* ceil\(n / 2\)"):
        _native.dadapt_kernel("dadapt_adam_fused_sliced", streams, coef, stride=2, **args)
    with pytest.raises(ValueError, match="takes stride=1, got 3"):
        _native.dadapt_kernel(
            "dadapt_adam_fused", [[x], [g], [x], [v], [x]], coef, stride=3, **args
        )
    with pytest.raises(ValueError, match=r"stream 3 holds None \(allowed only in streams \[2\]\)"):
        _native.dadapt_kernel("dadapt_adam_fused", [[x], [g], [x], [None], [x]], coef, **args)


@pytest.mark.parametrize("impl", ["auto", "loop"])
@pytest.mark.parametrize("cls", [DAdaptSGD, DAdaptAdam, Prodigy, ProdigyScheduleFree])
def test_slice_p_with_odd_parameters(cls, impl):
    """slice_p = 3 (and beta1 = 0 where it applies): a complex parameter steps exactly as its
    real view does (the package's contract); zero-size, 0-dim, non-contiguous and bf16
    parameters get 1-D s of ceil(n / 3) elements and move."""
    kw = {"slice_p": 3, "implementation": impl, "d0": 1e-3}
    if cls in (DAdaptAdam, Prodigy):
        kw["betas"] = (0.0, 0.99)
    gen = torch.Generator().manual_seed(3)
    complex_init = torch.randn(5, 3, dtype=torch.complex128, generator=gen)
    cplx = torch.nn.Parameter(complex_init.clone())
    real = torch.nn.Parameter(torch.view_as_real(complex_init).clone())
    odd = [
        torch.nn.Parameter(torch.zeros(0, 4)),
        torch.nn.Parameter(torch.tensor(0.7)),
        torch.nn.Parameter(torch.randn(7, 5, generator=gen).to(torch.bfloat16)),
        torch.nn.Parameter(torch.randn(6, 10, generator=gen).t()),  # non-contiguous
    ]
    init = [p.detach().clone() for p in odd]
    opts = [cls([cplx], **kw), cls([real], **kw), cls(odd, **kw)]
    for t in range(4):
        gen = torch.Generator().manual_seed(10 + t)
        cplx.grad = torch.randn(cplx.shape, dtype=cplx.dtype, generator=gen)
        real.grad = torch.view_as_real(cplx.grad).clone()
        for p in odd:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        for opt in opts:
            opt.step()
    assert torch.equal(torch.view_as_real(cplx.detach()), real.detach())
    assert opts[0].stats()["d"] == opts[1].stats()["d"] > 1e-3
    assert opts[0].state[cplx]["s"].shape == (10,)
    assert [opts[2].state[p]["s"].shape for p in odd] == [(0,), (1,), (12,), (20,)]
    assert odd[3].stride() == (1, 10)  # still the same view
    moved = [not torch.equal(p.detach(), q) for p, q in zip(odd[1:], init[1:], strict=True)]
    assert moved == [True, True, True]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "two-pass"])
@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (DAdaptSGD, {"slice_p": 4, "momentum": 0.9}),
        (DAdaptAdam, {"slice_p": 4, "betas": (0.0, 0.99)}),
        (Prodigy, {"slice_p": 4, "betas": (0.0, 0.99)}),
        (ProdigyScheduleFree, {"slice_p": 4}),
    ],
)
def test_memory_options_read_nothing_back_to_the_host(cls, kw, fuse, monkeypatch):
    """As tests/test_optim_common.py's trap (item, tolist, bool, float, int, index patched to
    raise inside step()), with the memory options on; the implicit-x0 check's one read at state
    creation goes through the copied storage and is counted separately above."""
    from hf_tuningfree.optim.base import _NonfiniteNotice

    params = _params()
    opt = cls(params, **kw)
    opt.FUSE = fuse and cls is not ProdigyScheduleFree

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host read of a tensor inside optimizer.step()")

    monkeypatch.setattr(_NonfiniteNotice, "watch", lambda self, counter: None)
    for t in range(3):
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = g
        with monkeypatch.context() as m:
            for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
                m.setattr(torch.Tensor, attr, forbidden)
            opt.step()
    assert opt.stats()["step"] == 3.0


@pytest.mark.parametrize("cls", [DAdaptAdam, Prodigy])
def test_switched_on_first_moment_has_the_state_dtype(cls):
    """A bf16 parameter is stepped as an fp32 copy; the buffer made at the switch is bf16 like
    the rest of its state (and like the buffer a beta1 > 0 run creates)."""
    p = torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))
    opt = cls([p], betas=(0.0, 0.99))
    for beta1 in (0.0, 0.9):
        opt.param_groups[0]["betas"] = (beta1, 0.99)
        p.grad = torch.randn(6, 4).to(torch.bfloat16)
        opt.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    assert st["exp_avg"].abs().max() > 0

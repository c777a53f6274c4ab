"""Memory options of the DoG family and ADOPT (issue 17): no stored ``x0`` for tensors that start
at zero, ADOPT's ``beta1 = 0`` without a first-moment buffer, DoG's subsampled distance
(``slice_p``). Each against the run it must reproduce (bit for bit where the numbers cannot
differ) or against an fp64 per-element statement of the algorithm, on the C path (CPU default)
and the torch paths, through a state-dict round trip and, for DoG, under FSDP2 on gloo."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_dog import REFERENCES, _as_lists, _current_etas, _groups_hp, _make_problem

from hf_tuningfree.optim import DoG, LDoG, TDoG, _native
from hf_tuningfree.optim.dog import core as dog_module
from hf_tuningfree.optim.reference import adopt as adopt_reference

CLASSES = {"dog": DoG, "ldog": LDoG, "tdog": TDoG}
#: "native" is the C loop on CPU; "native_off" is "native" with the C library switched off (the
#: loop runs); "foreach" is torch's fused SGD and foreach norms (DoG has no torch.compile kernel).
IMPLS = ["loop", "foreach", "native", "native_off"]


def _impl(name: str, monkeypatch) -> str:
    if name == "native_off":
        monkeypatch.setenv("HF_TUNINGFREE_NATIVE", "0")
        return "native"
    return name


def _zero_problem(seed: int = 0):
    """test_dog's problem with two tensors that start at 0 (LoRA's B), one of them with its first
    gradient at step 2 (its state is created then)."""
    init, grads = _make_problem(seed)
    init[0][1] = torch.zeros_like(init[0][1])
    init[2][0] = torch.zeros_like(init[2][0])
    return init, grads


def _run(init, grads, mode, impl, *, steps=None, dtype=torch.float64, **kw):
    params = [[torch.nn.Parameter(p.clone().to(dtype)) for p in grp] for grp in init]
    hp = _groups_hp(mode)
    opt = CLASSES[mode]([{"params": ps, **h} for ps, h in zip(params, hp, strict=True)], **kw,
                        implementation=impl)  # fmt: skip
    record = []
    for step_grads in grads[:steps]:
        _set_grads(params, step_grads, dtype)
        opt.step()
        record.append(_current_etas(opt, params, mode))
    return params, opt, record


def _set_grads(params, step_grads, dtype=torch.float64):
    for ps, gs in zip(params, step_grads, strict=True):
        for p, g in zip(ps, gs, strict=True):
            p.grad = None if g is None else g.to(dtype)


def _flat(nested):
    return [x for grp in nested for x in grp]


def _flat_state(opt, params):
    out = []
    for ps in params:
        for p in ps:
            st = opt.state.get(p, {})
            out += [(k, v.clone()) for k, v in sorted(st.items()) if isinstance(v, torch.Tensor)]
    return out


# --------------------------------------------------------------------------- 1. implicit x0
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["dog", "ldog", "tdog"])
def test_implicit_zero_x0_gives_the_stored_copy_run_bit_for_bit(mode, impl, monkeypatch):
    """Same parameters, step sizes and distances as with a stored all-zero x0, on every path; the
    two zero tensors (one fresh at step 2) keep no x0, every other tensor keeps its copy."""
    impl = _impl(impl, monkeypatch)
    init, grads = _zero_problem()
    ours, opt, etas = _run(init, grads, mode, impl)
    ref, ref_opt, ref_etas = _run(init, grads, mode, impl, implicit_zero_x0=False)
    assert etas == ref_etas
    for a, b in zip(_flat(ours), _flat(ref), strict=True):
        assert torch.equal(a, b)
    for gi, ps in enumerate(ours):
        for pi, p in enumerate(ps):
            zero = (gi, pi) in ((0, 1), (2, 0))
            assert ("x0" in opt.state[p]) is not zero, (gi, pi)
            assert "x0" in ref_opt.state[ref[gi][pi]]
            assert torch.equal(opt.state[p]["dist_sq"], ref_opt.state[ref[gi][pi]]["dist_sq"])
    saved = sum(v.nbytes for _, v in _flat_state(ref_opt, ref)) - sum(
        v.nbytes for _, v in _flat_state(opt, ours)
    )
    assert saved == 8 * (5 + 6)  # the two zero tensors' fp64 copies


@pytest.mark.parametrize("impl", ["loop", "native"])
@pytest.mark.parametrize("zero_init_scale", [True, False])
def test_implicit_zero_x0_matches_the_per_element_reference(zero_init_scale, impl):
    """fp64 against optim.reference.dog (its implicit x0 is the same number): L-DoG with the
    zero tensors' r_eps from zero_init_scale, and DoG; step sizes within 1e-12 relative."""
    init, grads = _zero_problem(seed=2)
    for mode in ("ldog", "dog"):
        hp = _groups_hp(mode)
        kw = {"zero_init_scale": zero_init_scale} if mode == "ldog" else {}
        expected, expected_etas = REFERENCES[mode](*_as_lists(init, grads), hp, **kw)
        params, opt, etas = _run(init, grads, mode, impl, **kw)
        for t, (a, b) in enumerate(zip(etas, expected_etas, strict=True)):
            if mode == "ldog":
                assert a.keys() == b.keys()
                for key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-12), (mode, t, key)
            else:
                assert a == pytest.approx(b, rel=1e-12), (mode, t)
        for p, e in zip(_flat(params), _flat(expected), strict=True):
            assert torch.allclose(p.detach().flatten(), torch.tensor(e, dtype=torch.float64),
                                  rtol=1e-12, atol=1e-14)  # fmt: skip
        assert "x0" not in opt.state[params[0][1]] and "x0" in opt.state[params[0][0]]


def test_the_zero_check_is_one_host_read_at_state_creation(monkeypatch):
    """One read of the step's flags at the first step, one at step 2 (a tensor's first gradient),
    none in the other steps; none with implicit_zero_x0=False."""
    calls = []
    original = dog_module._read_flags

    def counting(flags):
        calls.append(flags.numel())
        return original(flags)

    monkeypatch.setattr(dog_module, "_read_flags", counting)
    init, grads = _zero_problem()
    per_step = []
    params = [[torch.nn.Parameter(p.clone()) for p in grp] for grp in init]
    opt = DoG([{"params": ps} for ps in params])
    for step_grads in grads[:6]:
        _set_grads(params, step_grads)
        before = len(calls)
        opt.step()
        per_step.append(len(calls) - before)
    assert per_step == [1, 0, 1, 0, 0, 0]
    assert calls[0] == sum(g is not None for gs in grads[0] for g in gs)
    calls.clear()
    _run(init, grads, "ldog", "auto", steps=4, implicit_zero_x0=False)
    assert calls == []


def test_tiny_nonzero_and_empty_tensors():
    """A subnormal element keeps the copy (its L2 norm would underflow in fp32: the check is
    exact); an empty tensor and an all-zero one keep none."""
    tiny = torch.zeros(5)
    tiny[3] = 1e-45
    ps = [
        torch.nn.Parameter(t)
        for t in (tiny.clone(), torch.zeros(0), torch.zeros(4), -torch.zeros(2))
    ]
    opt = LDoG(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert ["x0" in opt.state[p] for p in ps] == [True, False, False, False]
    assert torch.equal(opt.state[ps[0]]["x0"], tiny)


@pytest.mark.parametrize("mode", ["dog", "ldog"])
@pytest.mark.parametrize("impl", ["native", "loop"])
def test_resume_without_x0_continues_bit_exactly(mode, impl):
    """A weights_only round trip after 5 steps (the late tensor not yet fresh) continues exactly
    as the uninterrupted run; the saved state holds no x0 for the zero tensors, and an optimizer
    built with implicit_zero_x0=False reads the missing x0 as implicit too."""
    init, grads = _zero_problem()
    full, _, full_etas = _run(init, grads, mode, impl)
    for flag in (True, False):
        params, opt, etas = _run(init, grads, mode, impl, steps=5)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        ids = [i for g in saved["param_groups"] for i in g["params"]]
        assert "x0" not in saved["state"][ids[1]] and "x0" in saved["state"][ids[0]]
        hp = _groups_hp(mode)
        opt2 = CLASSES[mode]([{"params": ps, **h} for ps, h in zip(params, hp, strict=True)],
                             implementation=impl, implicit_zero_x0=flag)  # fmt: skip
        opt2.load_state_dict(saved)
        for step_grads in grads[5:]:
            _set_grads(params, step_grads)
            opt2.step()
            etas.append(_current_etas(opt2, params, mode))
        assert etas == full_etas
        for a, b in zip(_flat(params), _flat(full), strict=True):
            assert torch.equal(a, b)
        assert "x0" not in opt2.state[params[2][0]]  # fresh after the resume: implicit


def test_deepcopy_keeps_the_constructor_options():
    """copy.deepcopy keeps implicit_zero_x0 and L-DoG's zero_init_scale (both constructor-only):
    the copy steps exactly as the original."""
    init, grads = _zero_problem()
    params, opt, _ = _run(init, grads, "ldog", "loop", steps=1, zero_init_scale=False,
                          implicit_zero_x0=False)  # fmt: skip
    twin_params, twin = copy.deepcopy((params, opt))  # one memo: the copy steps its own
    assert twin._zero_init_scale is False and twin._implicit_zero_x0 is False
    for step_grads in grads[1:4]:
        _set_grads(params, step_grads)
        _set_grads(twin_params, step_grads)
        opt.step()
        twin.step()
    assert "x0" in twin.state[twin_params[2][0]]  # fresh after the copy: stored (option kept)
    for a, b in zip(_flat(params), _flat(twin_params), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"implicit_zero_x0": 1}, "implicit_zero_x0 must be True or False"),
        ({"implicit_zero_x0": "yes"}, "implicit_zero_x0 must be True or False"),
    ],
)
@pytest.mark.parametrize("cls", [DoG, LDoG, TDoG])
def test_bad_memory_options_name_the_argument(cls, kwargs, match):
    """As every bool option of the package (validation.check_bool): a TypeError naming it."""
    with pytest.raises((TypeError, ValueError), match=match):
        cls([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_implicit_zero_x0_is_not_a_group_setting():
    with pytest.raises(ValueError, match="implicit_zero_x0 is a constructor argument"):
        DoG([{"params": [torch.nn.Parameter(torch.ones(2))], "implicit_zero_x0": False}])


def test_c_kernel_reads_a_null_x0_as_zero():
    """The C update with x0 None for some tensors equals it with explicit zero tensors, bit for
    bit (fp32 and fp64), and the per-tensor torch update."""
    if _native.load() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(0)
    # the C sum of squares (fp64 accumulator) against torch's; fp32: measured 4.9e-8, fp64 3.3e-16
    for dtype, rel in ((torch.float32, 1e-6), (torch.float64, 1e-14)):
        xs = [torch.randn(n, generator=gen, dtype=dtype) for n in (7, 40000, 3)]
        gs = [torch.randn_like(x) for x in xs]
        x0s = [torch.randn_like(xs[0]), None, None]
        steps = torch.tensor([0.1, 0.2, 0.3], dtype=dtype)
        ok = torch.tensor(True)
        a = [x.clone() for x in xs]
        b = [x.clone() for x in xs]
        out_a = torch.zeros(3, dtype=torch.float64)
        out_b = torch.zeros(3, dtype=torch.float64)
        _native.dog_update(a, gs, x0s, steps, 0.01, ok, out_a)
        zeros = [x0s[0], torch.zeros_like(xs[1]), torch.zeros_like(xs[2])]
        _native.dog_update(b, gs, zeros, steps, 0.01, ok, out_b)
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        assert torch.equal(out_a, out_b)
        assert out_a[1] == pytest.approx(float(a[1].double().square().sum()), rel=rel)


# --------------------------------------------------------------------------- FSDP2
def _fsdp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 10),
        torch.nn.Tanh(),
        torch.nn.Linear(10, 5),  # zeroed: LoRA's B; 5 rows over 2 ranks
        torch.nn.Tanh(),
        torch.nn.Linear(5, 1),
    ).double()
    with torch.no_grad():
        model[2].weight.zero_()
    return model


def _fsdp_data(steps: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, 16, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(steps, 16, 1, generator=gen, dtype=torch.float64)
    return x, y


def _fsdp_train(model, opt, name, x, y, rank=0, world=1):
    etas = []
    for t in range(x.shape[0]):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[t][rank::world]), y[t][rank::world]).backward()
        opt.step()
        if name == "ldog":
            etas.append([eta for _, eta in opt.etas()])
        else:
            etas.append([float(opt.global_state["eta"])])
    return etas


#: slice_p = 4: the first weight's rows split 5/5 (rank 1 starts at element 30, so its kept
#: elements start at local offset 2), the biases at element 5 (offset 3).
FSDP_CASES = (("dog", {}), ("ldog", {}), ("dog", {"slice_p": 4}), ("ldog", {"slice_p": 4}))


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    from dist_helpers import process_group, shard_fsdp2
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from hf_tuningfree.optim import create_optimizer

    with process_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        x, y = _fsdp_data(6)
        results = {}
        for name, kw in FSDP_CASES:
            model = shard_fsdp2(_fsdp_model(), mesh)
            opt = create_optimizer(name, model.parameters(), reps_rel=1e-3, **kw)
            etas = _fsdp_train(model, opt, name, x, y, rank, world)
            keys = [sorted(opt.state[p]) for p in model.parameters()]
            full = get_optimizer_state_dict(model, opt)
            dcp_keys = {fqn: sorted(st) for fqn, st in full["state"].items()}
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, (keys, dcp_keys))
            params = [p.full_tensor().detach().clone() for p in model.parameters()]
            results[f"{name}{kw}"] = {"etas": etas, "params": params, "keys": gathered}
        if rank == 0:
            torch.save(results, out)


@pytest.mark.slow
def test_fsdp2_implicit_x0_is_consistent_and_equals_one_process():
    """Two gloo ranks under FSDP2 (the zero tensor's rows split between them): same step sizes
    and parameters as one process, and every rank's state (and the distributed-checkpoint
    state dict) has the same keys, no x0 for the zero tensor."""
    from dist_helpers import spawn_and_collect

    x, y = _fsdp_data(6)
    sharded = spawn_and_collect(_fsdp_worker)
    for name, kw in FSDP_CASES:
        tag = f"{name}{kw}"
        model = _fsdp_model()
        from hf_tuningfree.optim import create_optimizer

        opt = create_optimizer(name, model.parameters(), reps_rel=1e-3, **kw)
        ref = _fsdp_train(model, opt, name, x, y)
        ours = sharded[tag]
        for t, (a, b) in enumerate(zip(ours["etas"], ref, strict=True)):
            # fp64; measured: eta 4.4e-16 relative, parameters 5.4e-19 absolute
            assert a == pytest.approx(b, rel=1e-14), f"{tag} step {t}"
        for a, p in zip(ours["params"], model.parameters(), strict=True):
            assert torch.allclose(a, p.detach(), rtol=1e-14, atol=1e-16), tag
        (keys0, dcp0), (keys1, dcp1) = ours["keys"]
        assert keys0 == keys1 and dcp0 == dcp1, tag
        assert "x0" not in keys0[2] and "x0" in keys0[0], tag  # [2]: the zeroed weight
        assert "x0" not in dcp0["2.weight"] and "x0" in dcp0["0.weight"], tag


# --------------------------------------------------------------------------- 2. ADOPT beta1 = 0
from hf_tuningfree.optim import ADOPT  # noqa: E402


class _BufferedADOPT(ADOPT):
    """ADOPT as before issue 17: a first-moment buffer at beta1 = 0 too (m = lerp(m, u, 1))."""

    _drop_unused_first_moment = False


ADOPT_IMPLS = ["loop", "foreach", "native", "compiled_torch"]


def _adopt_impl(name: str, monkeypatch) -> str:
    if name == "native":
        if _native.load() is None:
            pytest.skip("no C compiler")
        return "native"
    if name == "compiled_torch":  # the torch.compile kernel
        return "compiled"
    return name


def _reference_tolerance(impl: str) -> float:
    """1e-12 in fp64 on every path (measured ~1e-15; the torch.compile kernel's lr and clip bound
    were fp32 tensors until issue 17's review, 4.6e-8 off)."""
    return 1e-12


def _adopt_problem(seed=0, steps=30):
    gen = torch.Generator().manual_seed(seed)
    shapes = [[(3, 4), (5,), (70, 130)], [(4,), (1,)]]
    init = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in grp] for grp in shapes]
    grads = [
        [
            [
                None if (pi == 1 and t % 3 == 1) else torch.randn(p.shape, generator=gen,
                                                                  dtype=torch.float64)
                for pi, p in enumerate(grp)
            ]
            for grp in init
        ]
        for t in range(steps)
    ]  # fmt: skip
    hp = [
        dict(lr=0.05, betas=(0.0, 0.999), eps=1e-6, weight_decay=0.1, clip_exponent=0.25),
        dict(lr=0.02, betas=(0.0, 0.99), eps=1e-3, weight_decay=0.0, clip_exponent=None,
             maximize=True, decoupled_weight_decay=False),
    ]  # fmt: skip
    return init, grads, hp


def _adopt_run(cls, init, grads, hp, impl, *, switch=None, dtype=torch.float64):
    """``switch``: (step, beta1) sets every group's beta1 before that step."""
    params = [[torch.nn.Parameter(p.clone().to(dtype)) for p in grp] for grp in init]
    opt = cls([{"params": ps, **h} for ps, h in zip(params, hp, strict=True)],
              implementation=impl)  # fmt: skip
    for t, step_grads in enumerate(grads):
        if switch is not None and t == switch[0]:
            for g in opt.param_groups:
                g["betas"] = (switch[1], g["betas"][1])
        _set_grads(params, step_grads, dtype)
        opt.step()
    return params, opt


def _adopt_reference(init, grads, hp, switch=None):
    """``optim.reference.adopt`` on the problem (ADOPT's defaults for the keys ``hp`` leaves
    out); ``switch``: its ``beta1_switch``."""
    groups = [{"maximize": False, "decoupled_weight_decay": True, **h} for h in hp]
    return adopt_reference.adopt(*_as_lists(init, grads), groups, beta1_switch=switch)[0]


@pytest.mark.parametrize("impl", ADOPT_IMPLS)
def test_adopt_beta1_zero_allocates_no_first_moment_and_keeps_the_numbers(impl, monkeypatch):
    """beta1 = 0: no exp_avg in any state, the buffered run's numbers (bit for bit on the C,
    per-tensor and compiled paths; foreach formed m + (u - m), an ulp away) and the fp64
    per-element reference within 1e-12."""
    impl = _adopt_impl(impl, monkeypatch)
    init, grads, hp = _adopt_problem()
    ours, opt = _adopt_run(ADOPT, init, grads, hp, impl)
    ref, ref_opt = _adopt_run(_BufferedADOPT, init, grads, hp, impl)
    assert all("exp_avg" not in s for s in opt.state.values())
    assert all("exp_avg" in s for s in ref_opt.state.values())
    for a, b in zip(_flat(ours), _flat(ref), strict=True):
        if impl == "foreach":
            assert torch.allclose(a, b, rtol=1e-14, atol=1e-15)
        else:
            assert torch.equal(a, b)
    tol = _reference_tolerance(impl)
    for a, b in zip(_flat(ours), _flat(_adopt_reference(init, grads, hp)), strict=True):
        assert torch.allclose(a.detach().flatten(), torch.tensor(b, dtype=torch.float64),
                              rtol=tol, atol=tol)  # fmt: skip
    n = sum(p.numel() for p in _flat(ours))
    assert sum(v.nbytes for _, v in _flat_state(opt, ours)) == 8 * n + 4 * 5  # v + step
    assert sum(v.nbytes for _, v in _flat_state(ref_opt, ref)) == 16 * n + 4 * 5


@pytest.mark.parametrize("impl", ["native", "loop", "compiled_torch"])
def test_adopt_switching_beta1_on_and_off(impl, monkeypatch):
    """beta1 0 -> 0.9 at step 10 allocates exp_avg at 0 then (the per-element reference restarts
    m at 0); 0.9 -> 0 drops it and continues exactly as a buffer that is overwritten by u."""
    impl = _adopt_impl(impl, monkeypatch)
    init, grads, hp = _adopt_problem(seed=1, steps=16)
    ours, opt = _adopt_run(ADOPT, init, grads[:10], hp, impl)
    assert all("exp_avg" not in s for s in opt.state.values())
    for g in opt.param_groups:
        g["betas"] = (0.9, g["betas"][1])
    _set_grads(ours, grads[10])
    opt.step()
    p = ours[0][0]
    assert "exp_avg" in opt.state[p] and opt.state[p]["exp_avg"].shape == p.shape
    for step_grads in grads[11:]:
        _set_grads(ours, step_grads)
        opt.step()
    expected = _adopt_reference(init, grads, hp, switch=(10, 0.9))
    tol = _reference_tolerance(impl)
    for a, b in zip(_flat(ours), _flat(expected), strict=True):
        assert torch.allclose(a.detach().flatten(), torch.tensor(b, dtype=torch.float64),
                              rtol=tol, atol=tol)  # fmt: skip
    on = [dict(h, betas=(0.9, h["betas"][1])) for h in hp]
    off, off_opt = _adopt_run(ADOPT, init, grads, on, impl, switch=(8, 0.0))
    ref, _ = _adopt_run(_BufferedADOPT, init, grads, on, impl, switch=(8, 0.0))
    assert all("exp_avg" not in s for s in off_opt.state.values())
    for a, b in zip(_flat(off), _flat(ref), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["native", "loop"])
def test_adopt_beta1_zero_resume_is_bit_exact(impl, monkeypatch):
    """A weights_only round trip after 12 steps: no exp_avg saved, the continuation identical."""
    impl = _adopt_impl(impl, monkeypatch)
    init, grads, hp = _adopt_problem(seed=2, steps=20)
    full, _ = _adopt_run(ADOPT, init, grads, hp, impl)
    params, opt = _adopt_run(ADOPT, init, grads[:12], hp, impl)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert all("exp_avg" not in s for s in saved["state"].values())
    opt2 = ADOPT([{"params": ps, **h} for ps, h in zip(params, hp, strict=True)],
                 implementation=impl)  # fmt: skip
    opt2.load_state_dict(saved)
    for step_grads in grads[12:]:
        _set_grads(params, step_grads)
        opt2.step()
    for a, b in zip(_flat(params), _flat(full), strict=True):
        assert torch.equal(a, b)


def test_adopt_c_kernel_without_first_moment():
    """The C update with exp_avgs None equals it with a buffer at beta1 = 0 (fp32, fp64), and
    refuses None with beta1 != 0."""
    if _native.load() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        xs = [torch.randn(n, generator=gen, dtype=dtype) for n in (9, 30000)]
        gs = [torch.randn_like(x) for x in xs]
        vs = [torch.rand_like(x) for x in xs]
        kw = dict(lr=0.01, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled=True,
                  clip_exponent=0.25, maximize=False)  # fmt: skip
        a, b = [x.clone() for x in xs], [x.clone() for x in xs]
        va, vb = [v.clone() for v in vs], [v.clone() for v in vs]
        sa = [torch.full((), 3.0) for _ in xs]
        sb = [torch.full((), 3.0) for _ in xs]
        ok = torch.tensor(True)
        _native.adopt_update(a, gs, None, va, sa, ok, beta1=0.0, **kw)
        _native.adopt_update(b, gs, [torch.zeros_like(x) for x in xs], vb, sb, ok, beta1=0.0,
                             **kw)  # fmt: skip
        assert all(torch.equal(u, w) for u, w in zip(a + va + sa, b + vb + sb, strict=True))
        assert not torch.equal(a[1], xs[1])
        with pytest.raises(ValueError, match="beta1 == 0"):
            _native.adopt_update(a, gs, None, va, sa, ok, beta1=0.9, **kw)


# --------------------------------------------------------------------------- 3. slice_p
def _sliced_reference(init, grads, mode, k, **kw):
    """``optim.reference.dog`` with every group's ``slice_p = k`` (L-DoG: ``zero_init_scale``
    on unless ``kw`` says otherwise, as LDoG's default)."""
    hp = [dict(h, slice_p=k) for h in _groups_hp(mode)]
    if mode == "ldog":
        kw.setdefault("zero_init_scale", True)
    return REFERENCES[mode](*_as_lists(init, grads), hp, **kw)


def _check_against(etas, expected_etas, params, expected, mode, rel=1e-12):
    for t, (a, b) in enumerate(zip(etas, expected_etas, strict=True)):
        if mode == "ldog":
            assert a.keys() == b.keys()
            for key in b:
                assert a[key] == pytest.approx(b[key], rel=rel), (t, key)
        else:
            assert a == pytest.approx(b, rel=rel), t
    for p, e in zip(_flat(params), _flat(expected), strict=True):
        assert torch.allclose(p.detach().flatten(), torch.tensor(e, dtype=torch.float64),
                              rtol=rel, atol=rel)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["dog", "ldog"])
@pytest.mark.parametrize("k", [2, 7])
def test_slice_p_matches_the_per_element_statement(mode, k, impl, monkeypatch):
    """fp64, every path, the zero tensors implicit (exact distance), a tensor fresh at step 2:
    step sizes and parameters within 1e-12 of the independent per-element statement; x0 holds
    ceil(n / k) elements per stored tensor."""
    impl = _impl(impl, monkeypatch)
    init, grads = _zero_problem(seed=4)
    expected, expected_etas = _sliced_reference(init, grads, mode, k)
    params, opt, etas = _run(init, grads, mode, impl, slice_p=k)
    _check_against(etas, expected_etas, params, expected, mode)
    for gi, ps in enumerate(params):
        for pi, p in enumerate(ps):
            st = opt.state[p]
            if (gi, pi) in ((0, 1), (2, 0)):
                assert "x0" not in st
            else:
                assert st["x0"].shape == (-(-p.numel() // k),)
                assert torch.equal(st["x0"], init[gi][pi].flatten()[::k])
    # the estimate is not the exact distance (what it saves is not free)
    _, exact_etas = REFERENCES[mode](
        *_as_lists(init, grads),
        _groups_hp(mode),
        **({"zero_init_scale": True} if mode == "ldog" else {}),
    )
    assert etas[-1] != pytest.approx(exact_etas[-1], rel=1e-6)


@pytest.mark.parametrize("impl", ["loop", "native"])
def test_slice_p_with_stored_zero_copies_and_zero_init_scale(impl):
    """implicit_zero_x0=False: zero tensors keep a 1/k copy too and their distance is estimated
    (the reference with no implicit tensors: every tensor subsampled); L-DoG's zero_init_scale
    reads the kept elements of older states, scaled."""
    init, grads = _zero_problem(seed=5)
    init[1][0] = torch.zeros_like(init[1][0])
    params, _, etas = _run(init, grads, "ldog", impl, slice_p=3)
    expected, expected_etas = _sliced_reference(init, grads, "ldog", 3)
    _check_against(etas, expected_etas, params, expected, "ldog")
    ref_off = _sliced_reference(init, grads, "ldog", 3, zero_init_scale=False)
    params_off, _, etas_off = _run(init, grads, "ldog", impl, slice_p=3, zero_init_scale=False)
    _check_against(etas_off, ref_off[1], params_off, ref_off[0], "ldog")
    stored, stored_opt, stored_etas = _run(init, grads, "ldog", impl, slice_p=3,
                                           implicit_zero_x0=False)  # fmt: skip
    ref_stored = _sliced_reference(init, grads, "ldog", 3, implicit_zero_x0=False)
    _check_against(stored_etas, ref_stored[1], stored, ref_stored[0], "ldog")
    b = stored[0][1]
    assert stored_opt.state[b]["x0"].shape == (-(-b.numel() // 3),)
    assert not stored_opt.state[b]["x0"].any()
    assert stored_etas != etas  # the zero tensors' distances are now estimates


@pytest.mark.parametrize("mode", ["dog", "ldog"])
@pytest.mark.parametrize("impl", ["native", "loop"])
def test_slice_p_resume_is_bit_exact_and_a_changed_slice_p_is_an_error(mode, impl):
    init, grads = _zero_problem(seed=6)
    full, _, full_etas = _run(init, grads, mode, impl, slice_p=4)
    params, opt, etas = _run(init, grads, mode, impl, steps=6, slice_p=4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    hp = _groups_hp(mode)
    opt2 = CLASSES[mode](
        [{"params": ps, **h} for ps, h in zip(params, hp, strict=True)], implementation=impl
    )  # fmt: skip  (slice_p comes from the checkpoint)
    opt2.load_state_dict(saved)
    assert all(g["slice_p"] == 4 for g in opt2.param_groups)
    for step_grads in grads[6:]:
        _set_grads(params, step_grads)
        opt2.step()
        etas.append(_current_etas(opt2, params, mode))
    assert etas == full_etas
    for a, b in zip(_flat(params), _flat(full), strict=True):
        assert torch.equal(a, b)
    opt2.param_groups[0]["slice_p"] = 3
    _set_grads(params, grads[0])
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*slice_p=3"):
        opt2.step()


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2", None])
def test_slice_p_must_be_an_int_of_at_least_one(value):
    with pytest.raises(ValueError, match="Invalid slice_p"):
        LDoG([torch.nn.Parameter(torch.ones(2))], slice_p=value)
    with pytest.raises(ValueError, match="Invalid slice_p"):
        DoG([{"params": [torch.nn.Parameter(torch.ones(2))], "slice_p": value}])


def test_c_kernel_strided_distance_with_offsets():
    """The C update's strided sums (strides 3 and 5, offsets 0..4, tensors across several
    blocks) against torch's strided sums: same parameters bit for bit, sums within 1e-13
    (fp64) / 1e-6 (fp32) relative."""
    if _native.load() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(7)
    for dtype, rel in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        xs = [torch.randn(n, generator=gen, dtype=dtype) for n in (10, 30001, 8192 * 3 + 5, 4)]
        gs = [torch.randn_like(x) for x in xs]
        strides, offsets = [3, 5, 5, 3], [1, 4, 0, 2]
        x0s = [x[o::q].clone() + 0.5 for x, q, o in zip(xs, strides, offsets, strict=True)]
        steps = torch.tensor(0.1, dtype=dtype)
        a = [x.clone() for x in xs]
        out = torch.zeros(4, dtype=torch.float64)
        _native.dog_update(a, gs, x0s, steps, 0.0, torch.tensor(True), out,
                           x0_strides=strides, x0_offsets=offsets)  # fmt: skip
        for k, (x, g) in enumerate(zip(xs, gs, strict=True)):
            moved = x - 0.1 * g
            assert torch.allclose(a[k], moved, rtol=0, atol=4 * torch.finfo(dtype).eps)
            want = (a[k].double()[offsets[k] :: strides[k]] - x0s[k].double()).square().sum()
            assert float(out[k]) == pytest.approx(float(want), rel=rel)
        with pytest.raises(ValueError, match=r"stream 2 .* expected ceil\(\(n - 1\) / 3\) = 3"):
            _native.dog_update(a, gs, [x0s[0][:-1], *x0s[1:]], steps, 0.0, torch.tensor(True),
                               out, x0_strides=strides, x0_offsets=offsets)  # fmt: skip

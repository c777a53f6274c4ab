"""What every registered optimizer promises around its maths, on every code path (issue 14).

The promises are those ``torch.optim`` makes for its own optimizers, written down here for ours
and checked for each registry name on each way a step can run on a CPU that the optimizer has
(its registry entry's ``implementations``): ``auto`` (the default), ``loop``, ``foreach``,
``native`` (the C loops where a C compiler exists) and ``compiled`` (the ``torch.compile``
kernels that GPUs run, here through inductor's C++):

* a parameter that is a strided view (every other column of a buffer, a transpose) is updated
  exactly as the same values held contiguously would be, and memory next to it is not written;
* parameters with no elements and 0-dim parameters step;
* state that does not fit its parameter is refused with an error naming the parameter and the
  state key, when loaded and when a fast path would run on it, never by a crash (also under
  ``python -O``, which removes ``assert``);
* a step tells autograd that it wrote the parameters (their version counters move), so a step
  between a forward and its backward is an error rather than a silently wrong gradient;
* ``copy.deepcopy`` and pickling give an optimizer that continues exactly as the original;
* ``lr`` may be a one-element tensor of any shape ``[]``, ``[1]``, ``[1, 1]``;
* a complex parameter is optimized as its ``torch.view_as_real`` pairs, with the same result;
* a state dict from before a group setting existed (no ``maximize``, ...) loads with the
  constructor's values for what it lacks;
* torch's step and state-dict hooks run.
"""

from __future__ import annotations

import copy
import functools
import inspect
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from hf_tuningfree.optim import _native, available_optimizers, create_optimizer, get_optimizer_spec
from hf_tuningfree.optim.base import GLOBAL_STATE_KEY, ROUNDING_STATE_KEY
from hf_tuningfree.optim.kernels import IMPL_ENV_VAR, StateShapeError, fast_path_accepts

NAMES = available_optimizers()

#: Every value of ``implementation``; a name is run on those its registry entry offers.
PATHS = ("auto", "loop", "foreach", "native", "compiled")
#: The paths without torch.compile, for the tests whose subject is not a kernel (compiling every
#: optimizer's kernels costs ~2 s each; the kernel-facing tests run them).
EAGER_PATHS = [p for p in PATHS if p != "compiled"]


def _pairs(paths):
    """(name, path) for every registry name and each of ``paths`` it has."""
    out = []
    for name in NAMES:
        offered = ("auto", *get_optimizer_spec(name).implementations)
        out += [(name, p) for p in paths if p in offered]
    return out


STEPS = 3


def _make(name, params, **kwargs):
    """``create_optimizer`` with the registry's ``visible_lr`` where its ``lr`` does not move the
    weights in 3 fp32 steps (T-DoG divides DoG's step by its theory's taming factor, ~1e5-1e6)."""
    visible = get_optimizer_spec(name).visible_lr
    if visible is not None and "lr" not in kwargs:
        kwargs["lr"] = visible
    return create_optimizer(name, params, **kwargs)


@pytest.fixture
def implementation(request, monkeypatch) -> str:
    """The ``implementation`` value ``request.param``, with the C library on and no
    ``HF_TUNINGFREE_IMPL`` override."""
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    monkeypatch.delenv(_native.NATIVE_ENV_VAR, raising=False)
    return request.param


def all_paths(fn):
    pairs = _pairs(PATHS)
    return pytest.mark.parametrize(("name", "implementation"), pairs, indirect=["implementation"])(
        fn
    )


def eager_paths(fn):
    pairs = _pairs(EAGER_PATHS)
    return pytest.mark.parametrize(("name", "implementation"), pairs, indirect=["implementation"])(
        fn
    )


by_name = pytest.mark.parametrize("name", NAMES)


def _gradients(shapes, steps=STEPS, seed=0, dtype=torch.float32):
    """Per step, one gradient per shape: a fixed direction plus noise (so that the adaptive step
    sizes grow and the parameters move), independent of the iterates."""
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return [
        [(d + 0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype)
         for d, s in zip(direction, shapes, strict=True)]
        for _ in range(steps)
    ]  # fmt: skip


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


def _values(params):
    return [p.detach().clone() for p in params]


def _state(opt, params):
    """Every state tensor of ``params`` and every model-wide tensor, by name."""
    out = {}
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            out[f"{i}/{key}"] = value.detach().clone() if torch.is_tensor(value) else value
    for key, value in getattr(opt, "global_state", {}).items():
        out[f"global/{key}"] = value.detach().clone()
    return out


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if torch.is_tensor(value):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def _assert_equal(got, expected, what):
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.shape == b.shape, f"{what} {i}: shape {list(a.shape)} vs {list(b.shape)}"
        assert torch.equal(a, b), f"{what} {i}: max |diff| {(a - b).abs().max().item():.3g}"


# ---------------------------------------------------------------------- strided parameters
@all_paths
def test_strided_parameters_step_like_contiguous_ones_and_leave_their_neighbours(
    name, implementation
):
    """Every other column of a buffer, a transposed weight and a contiguous vector, with strided
    gradients: after 3 steps the parameters and every state tensor equal those of the same
    values held contiguously, bit for bit; the buffer's other columns are unchanged; the
    parameters moved."""
    buffer = torch.randn(6, 10)
    neighbours = buffer[:, 1::2].clone()
    transposed = torch.randn(5, 4).t()
    strided = [
        torch.nn.Parameter(buffer[:, ::2]),
        torch.nn.Parameter(transposed),
        torch.nn.Parameter(torch.randn(7)),
    ]
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    assert strided[0].data_ptr() == buffer.data_ptr()
    contiguous = [
        torch.nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format)) for p in strided
    ]
    start = _values(contiguous)
    grads = _gradients([p.shape for p in strided])
    strided_grads = [[g.t().contiguous().t() if g.dim() == 2 else g for g in s] for s in grads]

    opt_s = _make(name, strided, implementation=implementation)
    opt_c = _make(name, contiguous, implementation=implementation)
    _run(opt_s, strided, strided_grads)
    _run(opt_c, contiguous, grads)

    _assert_equal(_values(strided), _values(contiguous), "parameter")
    _assert_same_state(_state(opt_s, strided), _state(opt_c, contiguous))
    assert torch.equal(buffer[:, 1::2], neighbours), "memory next to a parameter was written"
    assert strided[0].data_ptr() == buffer.data_ptr()  # still the view: updated in place
    assert all(not torch.equal(a, b) for a, b in zip(_values(contiguous), start, strict=True))


@eager_paths
def test_zero_size_and_zero_dim_parameters(name, implementation):
    """A parameter with no elements and a 0-dim one, beside an ordinary one: the step runs, the
    empty parameter stays empty, the 0-dim one and the ordinary one move and stay finite."""
    params = [
        torch.nn.Parameter(torch.randn(4, 3)),
        torch.nn.Parameter(torch.zeros(0, 3)),
        torch.nn.Parameter(torch.tensor(0.5)),
    ]
    start = _values(params)
    opt = _make(name, params, implementation=implementation)
    _run(opt, params, _gradients([p.shape for p in params]))
    assert params[1].shape == (0, 3)
    assert params[2].shape == ()
    for i in (0, 2):
        assert torch.isfinite(params[i]).all()
        assert not torch.equal(params[i].detach(), start[i]), f"parameter {i} did not move"


# ---------------------------------------------------------------------- state that does not fit
def _stepped(name, implementation, shapes, steps=1):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = _make(name, params, implementation=implementation)
    _run(opt, params, _gradients(shapes, steps=steps))
    return params, opt


@eager_paths
def test_a_state_dict_for_other_shapes_is_refused_naming_parameter_and_key(name, implementation):
    """The state of a 10-element parameter loaded for a 1000-element one: ``ValueError`` naming
    the parameter and a state key; the optimizer keeps its own state and still steps."""
    _, small = _stepped(name, implementation, [(3, 2), (10,)])
    params, opt = _stepped(name, implementation, [(3, 2), (1000,)])
    before = _state(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] does not fit") as e:
        opt.load_state_dict(small.state_dict())
    saved_keys = set(small.state[small.param_groups[0]["params"][1]])
    assert any(f"'{k}' has shape [10]" in str(e.value) for k in saved_keys), str(e.value)
    assert "expected shape [1000]" in str(e.value)
    _assert_same_state(_state(opt, params), before)
    _run(opt, params, _gradients([p.shape for p in params], steps=1, seed=1))
    assert all(torch.isfinite(p).all() for p in params)


@all_paths
def test_state_changed_by_hand_is_an_error_not_a_crash(name, implementation):
    """A state tensor replaced by a shorter one after the first step: the next step raises a
    RuntimeError naming the parameter and the key before any path reads it, and changes
    nothing."""
    params, opt = _stepped(name, implementation, [(3, 2), (1000,)])
    big = params[1]
    key = next(k for k, v in opt.state[big].items() if torch.is_tensor(v) and v.numel() == 1000)
    opt.state[big][key] = opt.state[big][key][:10].clone()
    before, state = _values(params), _state(opt, params)
    with pytest.raises(RuntimeError) as e:
        _run(opt, params, _gradients([p.shape for p in params], steps=1, seed=1))
    assert (
        f"param_groups[0]['params'][1] does not fit it: {key!r} has shape [10], expected shape "
        "[1000]; nothing was updated"
    ) in str(e.value)
    _assert_equal(_values(params), before, "parameter")
    _assert_same_state(_state(opt, params), state)


def test_the_fast_paths_check_what_they_are_handed():
    """Below the optimizers' own check, the one eligibility test of the fused and C paths
    refuses a state tensor of another shape with an error naming its stream, and declines
    (False: the torch path runs) a strided tensor or a mixed dtype; the C wrappers check again
    what they hand to C (kept under ``python -O``)."""
    p, g = torch.zeros(4, 3), torch.zeros(4, 3)
    accepts = functools.partial(fast_path_accepts, dtypes=(torch.float32,), cpu_only=True)
    assert accepts([[p], [g]], ["param", "grad"])
    assert not accepts([[p], [torch.zeros(3, 4).t()]], ["param", "grad"])
    assert not accepts([[p], [g.double()]], ["param", "grad"])
    with pytest.raises(StateShapeError, match=r"exp_avg has shape \[10\] but its parameter has"):
        accepts([[p], [torch.zeros(10)]], ["param", "exp_avg"])
    if _native.load() is None:
        return  # no C compiler: the optimizers never call the C wrappers
    out = torch.zeros(1, dtype=torch.float64)
    _native.sum_sq([torch.ones(4, 3), torch.zeros(0)], out)
    assert out.item() == 12.0
    step = (torch.ones(()), 0.0, torch.ones((), dtype=torch.bool), out)
    with pytest.raises(ValueError, match="stream 2 does not have its parameters' number of"):
        _native.dog_update([p], [g], [torch.zeros(10)], *step)
    with pytest.raises(ValueError, match="stream 1 holds a tensor that is not a contiguous"):
        _native.dog_update([p], [torch.zeros(3, 4).t()], [p.clone()], *step)
    with pytest.raises(ValueError, match="stream 2 holds a tensor that is not a contiguous"):
        _native.dog_update([p], [g], [p.double()], *step)


#: Run with ``python -O`` (asserts removed): each optimizer, on its default path, with a state
#: tensor cut to 10 elements for a 100,000-element parameter, steps and must raise.
_OPTIMIZED_SCRIPT = """
import torch
from hf_tuningfree.optim import create_optimizer
assert False, "asserts are on: this must run under python -O"
for name in {names!r}:
    p = torch.nn.Parameter(torch.randn(100_000))
    opt = create_optimizer(name, [p])
    p.grad = torch.randn_like(p)
    opt.step()
    key = next(k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.numel() == p.numel())
    opt.state[p][key] = opt.state[p][key][:10].clone()
    try:
        opt.step()
    except RuntimeError as exc:
        print(name, "refused:", exc)
    else:
        print(name, "stepped")
"""


def test_mismatched_state_under_python_O_is_refused_not_a_segfault():
    """The optimizers that crashed (ADOPT, DAdaptAdam exited with SIGSEGV) or read past the end of
    ``x0`` (DoG) on the C path, under ``python -O``: each raises a RuntimeError naming the
    parameter and the key, and the process exits normally."""
    names = ["adopt", "dadapt_adam", "dog", "hyper_adam"]
    script = textwrap.dedent(_OPTIMIZED_SCRIPT).format(names=names)
    done = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == names
    for line in lines:
        assert "refused:" in line and "param_groups[0]['params'][0] does not fit" in line, line
        assert "has shape [10], expected shape [100000]" in line, line


# ---------------------------------------------------------------------- autograd
@all_paths
def test_step_bumps_version_counters_so_autograd_sees_the_write(name, implementation):
    """After a step every parameter's ``_version`` has moved; a step between a forward and its
    backward makes that backward raise "modified by an inplace operation"."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = _make(name, params, implementation=implementation)
    _run(opt, params, _gradients([p.shape for p in params], steps=1))
    versions = [p._version for p in params]
    loss = sum((p * p).sum() for p in params)  # saves the parameters for backward
    for p, g in zip(params, _gradients([p.shape for p in params], steps=1, seed=1)[0], strict=True):
        p.grad = g
    opt.step()
    assert all(p._version > v for p, v in zip(params, versions, strict=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------- copies
@all_paths
def test_deepcopy_continues_exactly_like_the_original(name, implementation):
    """``copy.deepcopy`` after 2 steps: 2 more steps of the copy and the original with the same
    gradients give the same parameters, state and model-wide values, bit for bit."""
    shapes = [(4, 3), (5,)]
    params, opt = _stepped(name, implementation, shapes, steps=2)
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"]
    assert all(a is not b for a, b in zip(twin_params, params, strict=True))
    grads = _gradients(shapes, steps=2, seed=1)
    _run(opt, params, grads)
    _run(twin, twin_params, grads)
    _assert_equal(_values(twin_params), _values(params), "parameter")
    _assert_same_state(_state(twin, twin_params), _state(opt, params))
    assert twin.stats() == opt.stats()


@eager_paths
def test_pickle_round_trip_continues_exactly_like_the_original(name, implementation):
    """``pickle.loads(pickle.dumps(opt))`` after 2 steps keeps ``global_state`` and the
    constructor's options: it steps as the original does, bit for bit."""
    shapes = [(4, 3), (5,)]
    params, opt = _stepped(name, implementation, shapes, steps=2)
    twin = pickle.loads(pickle.dumps(opt))
    assert type(twin) is type(opt)
    twin_params = twin.param_groups[0]["params"]
    _assert_same_state(_state(twin, twin_params), _state(opt, params))
    grads = _gradients(shapes, steps=2, seed=1)
    _run(opt, params, grads)
    _run(twin, twin_params, grads)
    _assert_equal(_values(twin_params), _values(params), "parameter")
    assert twin.stats() == opt.stats()


# ---------------------------------------------------------------------- tensor lr
@eager_paths
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "[1]", "[1,1]"])
def test_a_one_element_tensor_lr_is_the_number_it_holds(name, implementation, shape):
    """``lr`` given as a one-element tensor of shape ``[]``, ``[1]`` or ``[1, 1]`` steps exactly
    as the float it holds; so does a tensor assigned to ``group["lr"]`` after construction."""
    shapes = [(6, 5), (5,)]
    init = [torch.randn(s) for s in shapes]
    grads = _gradients(shapes)
    lr = float(torch.tensor(_make(name, [torch.zeros(1)]).defaults["lr"]))  # an fp32 number
    runs = []
    for how in ("float", "tensor", "assigned"):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        given = torch.full(shape, lr) if how == "tensor" else lr
        opt = _make(name, params, lr=given, implementation=implementation)
        if how == "assigned":
            opt.param_groups[0]["lr"] = torch.full(shape, lr)
        _run(opt, params, grads)
        runs.append(_values(params))
    _assert_equal(runs[1], runs[0], "tensor lr, parameter")
    for a, b in zip(runs[2], runs[0], strict=True):  # 0-dim fp32 tensor arithmetic vs a float
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)  # fp32: measured 0 on every path


@by_name
def test_a_tensor_lr_of_several_elements_is_refused(name):
    """By the registry (a type error naming ``lr``) and by the class itself."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match=r"'lr' of optimizer .* must be float, got Tensor"):
        create_optimizer(name, params, lr=torch.ones(2))
    cls = type(create_optimizer(name, params))
    with pytest.raises(ValueError, match=r"Invalid lr: .*one-element tensor"):
        cls(params, lr=torch.ones(2))


# ---------------------------------------------------------------------- complex parameters
@eager_paths
def test_complex_parameters_equal_their_real_view(name, implementation):
    """Complex parameters with complex gradients give exactly the parameters that the same
    optimizer gives on their ``view_as_real`` pairs (real tensors with a trailing 2)."""
    shapes = [(4, 3), (5,)]
    init = [torch.randn(s, dtype=torch.complex64) for s in shapes]
    grads = _gradients([(*s, 2) for s in shapes])
    real = [torch.nn.Parameter(torch.view_as_real(z).clone()) for z in init]
    cplx = [torch.nn.Parameter(z.clone()) for z in init]
    opt_r = _make(name, real, implementation=implementation)
    opt_c = _make(name, cplx, implementation=implementation)
    _run(opt_r, real, grads)
    _run(opt_c, cplx, [[torch.view_as_complex(g) for g in step] for step in grads])
    assert all(p.dtype == torch.complex64 for p in cplx)
    _assert_equal([torch.view_as_real(p.detach()) for p in cplx], _values(real), "parameter")
    assert not torch.equal(torch.view_as_real(cplx[0].detach()), torch.view_as_real(init[0]))


# ---------------------------------------------------------------------- old state dicts
@eager_paths
def test_a_state_dict_without_newer_group_keys_loads_with_the_constructor_values(
    name, implementation
):
    """A state dict whose groups hold only ``params`` and ``lr`` (an older version, or one written
    by hand: no ``maximize``, no ``implementation``, ...) loads; the loaded optimizer steps as the
    one that wrote it."""
    shapes = [(4, 3), (5,)]
    params, opt = _stepped(name, implementation, shapes, steps=2)
    saved = copy.deepcopy(opt.state_dict())  # a state dict holds the live state tensors
    stripped = [
        {k: v for k, v in g.items() if k in ("params", "lr", GLOBAL_STATE_KEY, ROUNDING_STATE_KEY)}
        for g in saved["param_groups"]
    ]
    missing = set(saved["param_groups"][0]) - set(stripped[0])
    assert "implementation" in missing
    assert "maximize" in missing  # every optimizer here has it (the DoG family by negation)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = _make(name, copies, implementation=implementation)
    loaded.load_state_dict({**saved, "param_groups": stripped})
    assert loaded.param_groups[0].keys() == opt.param_groups[0].keys()
    assert set(loaded.keys_filled_on_load) == missing & set(opt.defaults)
    for key in missing:
        assert loaded.param_groups[0][key] == opt.param_groups[0][key], key
    grads = _gradients(shapes, steps=2, seed=1)
    _run(opt, params, grads)
    _run(loaded, copies, grads)
    _assert_equal(_values(copies), _values(params), "parameter")


# ---------------------------------------------------------------------- hooks
@by_name
def test_step_and_state_dict_hooks_run(name):
    """``register_step_pre_hook`` sees the parameters before the update and
    ``register_step_post_hook`` after it, once per step (a subclass overriding ``step()`` and
    calling its parent's would run them twice); a state-dict post hook's additions are in
    ``state_dict()``, and a load pre hook can change what is loaded."""
    for other in NAMES:  # torch wraps a class's step() with the hooks at its first instance:
        _make(other, [torch.nn.Parameter(torch.zeros(1))])  # wrap them all, whatever ran before
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = _make(name, params)
    _run(opt, params, _gradients([(4, 3)], steps=1))  # ADOPT's first step only sets its state
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", _values(params)[0])))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", _values(params)[0])))
    before = _values(params)[0]
    _run(opt, params, _gradients([(4, 3)], steps=1, seed=1))
    assert [kind for kind, _ in seen] == ["pre", "post"]
    assert torch.equal(seen[0][1], before)
    assert torch.equal(seen[1][1], params[0].detach())
    assert not torch.equal(seen[1][1], before)

    def mark(optimizer, state_dict):
        state_dict["written_by"] = "post hook"
        return state_dict

    opt.register_state_dict_post_hook(mark)
    saved = opt.state_dict()
    assert saved["written_by"] == "post hook"
    assert GLOBAL_STATE_KEY in saved["param_groups"][0]

    def lower_lr(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.5 * state_dict["param_groups"][0]["lr"]
        return state_dict

    loaded_calls = []
    twin = _make(name, [torch.nn.Parameter(params[0].detach().clone())])
    twin.register_load_state_dict_pre_hook(lower_lr)
    twin.register_load_state_dict_post_hook(lambda o: loaded_calls.append(len(o.state)))
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["lr"] == 0.5 * opt.param_groups[0]["lr"]
    assert loaded_calls == [1]
    assert opt.param_groups[0]["lr"] == saved["param_groups"][0]["lr"]  # the saved dict unchanged


# ---------------------------------------------------------------------- constructor-only options
@by_name
def test_constructor_only_options_in_a_param_group_are_an_error(name):
    """Every constructor argument that is not a per-group setting (``skip_nonfinite``,
    ``global_reduce``; the hypergradient tower's ``learn``, ``height``, ``hyper_lr``, ...) named
    in a param group raises a ValueError naming it, in the constructor and in
    ``add_param_group``, instead of being silently ignored."""
    opt = _make(name, [torch.nn.Parameter(torch.zeros(2))])
    cls = type(opt)
    signature = inspect.signature(cls.__init__).parameters
    per_group = set(opt.param_groups[0])
    only = [k for k in signature if k not in ("self", "params") and k not in per_group]
    assert {"skip_nonfinite", "global_reduce"} <= set(only)
    for key in only:
        value = signature[key].default
        message = rf"{cls.__name__}: {key} is a constructor argument .* cannot be set in a param"
        with pytest.raises(ValueError, match=message):
            cls([{"params": [torch.nn.Parameter(torch.zeros(2))], key: value}])
        with pytest.raises(ValueError, match=message):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], key: value})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------- the C library and notices
def test_c_library_cache_follows_the_package_convention_and_can_be_switched_off(
    monkeypatch, tmp_path
):
    """The library is built as ``hf_tuningfree_cpu_kernels_<hash>.so`` in ``$HF_TUNINGFREE_CACHE``,
    else ``$XDG_CACHE_HOME/hf_tuningfree``; ``HF_TUNINGFREE_NATIVE=0`` makes ``load()`` None (the
    torch paths run)."""
    monkeypatch.delenv("HF_TUNINGFREE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _native.loader._cache_dir() == str(tmp_path / "xdg" / "hf_tuningfree")
    monkeypatch.setenv("HF_TUNINGFREE_CACHE", str(tmp_path / "own"))
    assert _native.loader._cache_dir() == str(tmp_path / "own")
    assert _native.LIBRARY_NAME == "hf_tuningfree_cpu_kernels"
    for off in ("0", "false", "off"):
        monkeypatch.setenv(_native.NATIVE_ENV_VAR, off)
        assert _native.load() is None and not _native.enabled()
    monkeypatch.setenv(_native.NATIVE_ENV_VAR, "1")
    assert _native.enabled()


def test_skipped_step_warning_repeats_when_the_count_doubles():
    """Warnings at the 1st, 2nd, 4th and 8th skipped step, not at the others."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = create_optimizer("adopt", [p])
    counts = []
    for _ in range(9):
        p.grad = torch.full((3,), float("nan"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        counts.append(sum("NaN or Inf" in str(w.message) for w in caught))
    assert counts == [1, 1, 0, 1, 0, 0, 0, 1, 0]
    assert opt.stats()["skipped_steps"] == 9.0


# ---------------------------------------------------------------------- per-group values
BAD_GROUP_VALUES = {
    "lr": (-1.0, r"Invalid lr: -1.0; allowed"),
    "weight_decay": (-0.1, r"Invalid weight_decay: -0.1; allowed"),
    "eps": (0.0, r"Invalid eps: 0.0; allowed"),
    "betas": ((0.9, 1.5), r"Invalid betas"),
    "maximize": ("yes", r"maximize must be True or False, got str 'yes'"),
    "decoupled_weight_decay": (1, r"decoupled_weight_decay must be True or False, got int 1"),
}


@pytest.mark.parametrize("name", available_optimizers(aliases=False))
def test_a_bad_per_group_value_is_refused_when_the_group_is_added(name):
    """A group's own ``lr``, ``weight_decay``, ``eps``, ``betas``, ``maximize`` or
    ``decoupled_weight_decay`` (those the optimizer has) gets the constructor's one-line error,
    from a group of the constructor's list and from ``add_param_group``, and nothing is added."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = create_optimizer(name, [p])
    keys = [k for k in BAD_GROUP_VALUES if k in opt.defaults]
    assert {"lr", "weight_decay"} <= set(keys), keys
    for key in keys:
        bad, message = BAD_GROUP_VALUES[key]
        group = {"params": [torch.nn.Parameter(torch.zeros(2))], key: bad}
        with pytest.raises((ValueError, TypeError), match=message):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1, key
        listed = [{"params": [torch.nn.Parameter(torch.zeros(2))], key: bad}]
        with pytest.raises((ValueError, TypeError), match=message):
            create_optimizer(name, listed)

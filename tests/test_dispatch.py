"""The one dispatch rule (``optim.kernels.choose_path``) and what ``implementation=`` means.

Every optimizer picks the form that runs a bucket through ``choose_path`` with its class's
``PATHS`` (the forms it has) and ``AUTO_ORDER``; each value of ``implementation`` means one thing
on every optimizer: ``"native"`` the C loops, ``"compiled"`` torch.compile, ``"foreach"`` the
multi-tensor form, ``"loop"`` the per-tensor loop. A form an optimizer lacks is refused when the
arguments are checked, before any model is built.
"""

from __future__ import annotations

import pytest
import torch

from hf_tuningfree.optim import (
    _native,
    available_optimizers,
    create_optimizer,
    get_optimizer_spec,
    kernels,
)
from hf_tuningfree.optim.kernels import (
    CPU_COMPILE_MIN_NUMEL,
    IMPL_ENV_VAR,
    PATHS,
    AutoOrder,
    choose_path,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it
MPS = torch.device("mps")
ALL = ("native", "compiled", "foreach", "loop")
NAMES = available_optimizers(aliases=False)


def _yes() -> bool:
    return True


def _no() -> bool:
    return False


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)


@pytest.fixture
def compile_everywhere(monkeypatch):
    """``compile_available`` true on every device (CUDA with Triton, as on a GPU machine)."""
    monkeypatch.setattr(kernels, "compile_available", lambda device: True)


# --------------------------------------------------------------------------- choose_path
@pytest.mark.parametrize("path", ALL)
def test_an_explicit_form_that_the_bucket_takes_is_the_form_that_runs(path, compile_everywhere):
    got = choose_path(path, CPU, 10, offered=ALL, order=AutoOrder(), native=_yes, foreach=_yes)
    assert got == path


@pytest.mark.parametrize(
    ("path", "device", "native", "foreach"),
    [
        ("native", CPU, _no, None),  # the C loops refuse the bucket (bf16, strided, no compiler)
        ("native", CUDA, _yes, None),  # C is CPU only
        ("native", CPU, None, None),  # a piece of the step without a C form
        ("foreach", CPU, None, _no),  # the fused kernel refuses the bucket
    ],
    ids=["native-refused", "native-on-cuda", "native-absent", "foreach-refused"],
)
def test_an_explicit_form_that_the_bucket_cannot_take_runs_the_loop(path, device, native, foreach):
    got = choose_path(path, device, 10, offered=ALL, order=AutoOrder(), native=native,
                      foreach=foreach)  # fmt: skip
    assert got == "loop"


def test_a_form_outside_offered_runs_the_loop():
    """A piece of a step with fewer forms than its optimizer (HyperSGD's dot products have no
    foreach form): the requested form it lacks runs as the loop there."""
    got = choose_path("foreach", CPU, 10, offered=("compiled", "loop"), order=AutoOrder())
    assert got == "loop"


def test_explicit_compiled_is_taken_even_where_compile_looks_unavailable(monkeypatch):
    """``"compiled"`` is asked for: the kernel itself warns and runs the loop if compiling
    fails (CompiledKernel), so choose_path does not second-guess it."""
    monkeypatch.setattr(kernels, "compile_available", lambda device: False)
    assert choose_path("compiled", CUDA, 10, offered=ALL, order=AutoOrder()) == "compiled"


def test_auto_on_cpu_walks_native_then_compiled_for_large_buckets_then_loop(compile_everywhere):
    order = AutoOrder()
    big, small = CPU_COMPILE_MIN_NUMEL, CPU_COMPILE_MIN_NUMEL - 1
    assert choose_path("auto", CPU, small, offered=ALL, order=order, native=_yes) == "native"
    assert choose_path("auto", CPU, small, offered=ALL, order=order, native=_no) == "loop"
    assert choose_path("auto", CPU, big, offered=ALL, order=order, native=_no) == "compiled"
    # the default CPU order never takes plain foreach ops (no faster than the loop on CPU)
    assert choose_path("auto", CPU, small, offered=("foreach", "loop"), order=order) == "loop"


def test_auto_on_cuda_takes_compiled_then_foreach(monkeypatch):
    order = AutoOrder()
    monkeypatch.setattr(kernels, "compile_available", lambda device: True)
    assert choose_path("auto", CUDA, 10, offered=ALL, order=order, native=_yes) == "compiled"
    monkeypatch.setattr(kernels, "compile_available", lambda device: False)  # no Triton
    assert choose_path("auto", CUDA, 10, offered=ALL, order=order) == "foreach"
    assert choose_path("auto", CUDA, 10, offered=("native", "compiled", "loop"), order=order) == (
        "loop"
    )
    assert choose_path("auto", MPS, 10, offered=ALL, order=order) == "foreach"


def test_an_optimizers_own_order_decides_auto(compile_everywhere):
    """DoG's order: C, then torch's fused SGD kernel, then the loop; HyperSGD's puts its fused
    kernel before the compiled one on CUDA."""
    dog, hyper = get_optimizer_spec("dog").cls, get_optimizer_spec("hyper_sgd").cls
    args = {"offered": dog.PATHS, "order": dog.AUTO_ORDER}
    assert choose_path("auto", CPU, 10, native=_no, foreach=_yes, **args) == "foreach"
    assert choose_path("auto", CPU, 10, native=_no, foreach=_no, **args) == "loop"
    assert choose_path("auto", CUDA, 10, foreach=_yes, **args) == "foreach"
    args = {"offered": hyper.PATHS, "order": hyper.AUTO_ORDER}
    assert choose_path("auto", CUDA, 10, foreach=_yes, **args) == "foreach"
    assert choose_path("auto", CUDA, 10, foreach=_no, **args) == "compiled"


def test_the_environment_replaces_auto_only_and_only_by_an_offered_form(monkeypatch):
    monkeypatch.setenv(IMPL_ENV_VAR, "loop")
    assert choose_path("auto", CPU, 10, offered=ALL, order=AutoOrder(), native=_yes) == "loop"
    # an explicit request is not overridden
    assert choose_path("native", CPU, 10, offered=ALL, order=AutoOrder(), native=_yes) == "native"
    # a form the optimizer lacks: its own "auto" holds
    monkeypatch.setenv(IMPL_ENV_VAR, "foreach")
    offered = ("native", "compiled", "loop")
    assert choose_path("auto", CPU, 10, offered=offered, order=AutoOrder(), native=_yes) == "native"


def test_a_bad_environment_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(IMPL_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"Invalid HF_TUNINGFREE_IMPL='fast'; allowed: one of"):
        choose_path("auto", CPU, 10, offered=ALL, order=AutoOrder())


def test_the_forms_are_the_four_and_auto():
    assert kernels.IMPLEMENTATIONS == ("auto", "native", "compiled", "foreach", "loop")
    assert PATHS == ("native", "compiled", "foreach", "loop")


# --------------------------------------------------------------------------- the optimizers
@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_declares_its_forms_and_refuses_the_others_early(name):
    """The registry entry lists the forms; one the optimizer lacks is a one-line ValueError
    naming the optimizer, the form and what is allowed, from the overrides check (before a model
    exists), from the constructor and from ``add_param_group``."""
    spec = get_optimizer_spec(name)
    offered = spec.implementations
    assert offered and set(offered) <= set(PATHS) and "loop" in offered
    assert spec.validate_overrides({"implementation": "auto"}) == {"implementation": "auto"}
    missing = [p for p in PATHS if p not in offered]
    cls = spec.cls.__name__
    for bad in [*missing, "fused"]:
        detail = f" \\(it has no {bad} form\\)" if bad in PATHS else ""
        message = rf"Invalid implementation.*'{bad}'{detail}; allowed: one of \['auto'"
        with pytest.raises(ValueError, match=message):
            spec.validate_overrides({"implementation": bad})
        with pytest.raises(ValueError, match=message):
            create_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], implementation=bad)
        opt = create_optimizer(name, [torch.nn.Parameter(torch.zeros(2))])
        with pytest.raises(ValueError, match=message):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))],
                                 "implementation": bad})  # fmt: skip
        if bad in PATHS:
            with pytest.raises(ValueError, match=f"for {cls}"):
                spec.validate_overrides({"implementation": bad})


def test_which_optimizers_have_which_forms():
    """What the issue trackers of fast optimizers get asked first: which path runs. Written
    down so that a form added or dropped is a visible change."""
    forms = {n: get_optimizer_spec(n).implementations for n in NAMES}
    assert {n for n, f in forms.items() if "foreach" not in f} == set()
    assert {n for n, f in forms.items() if "compiled" not in f} == {"dog", "ldog", "tdog"}
    assert {n for n, f in forms.items() if "native" not in f} == {"prodigy_sf"}


@pytest.fixture
def c_calls(monkeypatch):
    """Counts the calls into the C library (every kernel goes through
    ``_native.loader._library``)."""
    calls = []
    real = _native.loader._library

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(_native.loader, "_library", counted)
    return calls


def _three_steps(name, implementation, dtype=torch.float32):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 30, dtype=dtype)),
              torch.nn.Parameter(torch.randn(30, dtype=dtype))]  # fmt: skip
    spec = get_optimizer_spec(name)
    lr = spec.visible_lr if spec.visible_lr is not None else spec.lr
    opt = create_optimizer(name, params, lr=lr, implementation=implementation)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    moved = min((p.detach() - b).abs().max().item() for p, b in zip(params, before, strict=True))
    return moved


@pytest.mark.skipif(_native.load() is None, reason="no C compiler on this machine")
@pytest.mark.parametrize(
    "name", [n for n in NAMES if "native" in get_optimizer_spec(n).implementations]
)
def test_native_enters_the_c_library_and_loop_and_foreach_do_not(name, c_calls):
    assert _three_steps(name, "native") > 0
    assert len(c_calls) > 0, f"{name}: 'native' did not run the C loops"
    c_calls.clear()
    for impl in ("loop", "foreach"):
        if impl in get_optimizer_spec(name).implementations:
            assert _three_steps(name, impl) > 0
    assert c_calls == [], f"{name}: loop/foreach entered the C library"


@pytest.mark.parametrize("name", ["adopt", "dadapt_adam", "hyper_sgd"])
def test_compiled_is_torch_compile_on_cpu_not_the_c_loops(name, c_calls):
    """``"compiled"`` meant the C loops on CPU before the forms were separated; now it is
    torch.compile on every device (one per family: each compile costs seconds)."""
    compiled = kernels.CompiledKernel.__call__
    used = []

    def spy(self, tensors, *args, **kwargs):
        used.append(self.name)
        return compiled(self, tensors, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels.CompiledKernel, "__call__", spy)
        assert _three_steps(name, "compiled") > 0
    assert used, f"{name}: 'compiled' did not run a compiled kernel"
    assert c_calls == [], f"{name}: 'compiled' entered the C library"


@pytest.mark.parametrize("name", ["adopt", "dog", "prodigy"])
def test_native_on_bf16_parameters_runs_the_loop_and_steps(name, c_calls):
    """bf16 is not a dtype of the C loops: the requested form they cannot take runs the loop,
    and the step still moves the weights."""
    assert _three_steps(name, "native", dtype=torch.bfloat16) > 0
    assert c_calls == [], f"{name}: bf16 tensors were handed to the C library"

"""A rebuilt model works like any model: training, copies, dtypes, torch.compile, torch.export, DDP.

Each test runs on rebuilt models: a torchvision ResNet-18 whose ``fc`` is
replaced by ``Linear(512, 10)`` and whose ``layer1.0.conv1`` is widened from 64
to 72 filters (a site inside a residual block that does not feed the residual
join, so the change stops at ``layer1.0.conv2``), the same model saved and
loaded back through :mod:`fxindex.io`, and a small CNN with an inserted
Dropout. Compilation uses the ``eager``/``aot_eager`` backends to stay fast;
one test uses the default inductor backend on the small CNN when a C++
compiler is installed.
"""

from __future__ import annotations

import copy
import datetime
import os
import pickle
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import fx, nn

import fxindex
from fxindex._io import load, save
from fxindex._recipe import recipe

# --------------------------------------------------------------------------- models


class SmallNet(nn.Module):
    """conv-bn-relu, global pooling, a Linear: small enough for inductor and DDP in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def widened_conv(conv: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    """A Conv2d like ``conv`` with more filters, the old ones copied (function-preserving)."""
    wider = nn.Conv2d(
        conv.in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    with torch.no_grad():
        wider.weight[: conv.out_channels] = conv.weight
        if conv.bias is not None:
            wider.bias[: conv.out_channels] = conv.bias
    return wider


def rebuild_small(original: SmallNet, inputs: tuple[torch.Tensor]) -> fx.GraphModule:
    """conv1 widened 8 -> 12, a Dropout inserted after the ReLU."""
    gm = fxindex.replace(original, "conv1", widened_conv(original.conv1, 12), example_inputs=inputs)
    return fxindex.insert(gm, "relu", nn.Dropout(0.5))


def rebuild_resnet(original: nn.Module, inputs: tuple[torch.Tensor]) -> fx.GraphModule:
    """fc -> Linear(512, 10); layer1.0.conv1 widened 64 -> 72."""
    conv = original.get_submodule("layer1.0.conv1")
    return fxindex.replace(
        original,
        {"layer1.0.conv1": widened_conv(conv, 72), "fc": nn.Linear(512, 10)},
        example_inputs=inputs,
    )


@dataclass
class Case:
    """A rebuilt model with what the tests need to know about it."""

    name: str
    original: nn.Module
    rebuilt: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]
    # Parameters of new layers and of layers rebuilt by propagation: gradients must reach them.
    new_parameters: list[str]
    rebuilt_batch_norm: str
    fresh: Callable[[], nn.Module] = field(repr=False)


def _resnet_case(tmp_root: Path, loaded: bool) -> Case:
    import torchvision  # here, not at the top: the DDP workers import this module and need no torchvision

    torch.manual_seed(0)
    original = torchvision.models.resnet18(weights=None).eval()
    inputs = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
    rebuilt = rebuild_resnet(original, inputs)
    if loaded:
        folder = save(rebuilt, tmp_root / "resnet18")
        rebuilt = load(torchvision.models.resnet18(weights=None), folder)
    return Case(
        name="resnet18-loaded" if loaded else "resnet18",
        original=original,
        rebuilt=rebuilt,
        inputs=inputs,
        new_parameters=["fc.weight", "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight"],
        rebuilt_batch_norm="layer1.0.bn1",
        fresh=lambda: torchvision.models.resnet18(weights=None),
    )


def _small_case() -> Case:
    torch.manual_seed(0)
    original = SmallNet().eval()
    inputs = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)
    # The inserted Dropout was built in training mode; the model is used in eval mode.
    return Case(
        name="smallnet",
        original=original,
        rebuilt=rebuild_small(original, inputs).eval(),
        inputs=inputs,
        new_parameters=["conv1.weight", "bn.weight", "fc.weight"],
        rebuilt_batch_norm="bn",
        fresh=SmallNet,
    )


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """The rebuilt models, built once per module (tests copy before they change one)."""
    root = tmp_path_factory.mktemp("ecosystem")
    built = [_resnet_case(root, loaded=False), _resnet_case(root, loaded=True), _small_case()]
    return {case.name: case for case in built}


# The loaded ResNet is the same model as the rebuilt one (checked below); it runs the
# tests where loading could plausibly make a difference, the others keep CI fast.
CASES = ["resnet18", "smallnet"]
WITH_LOADED = ["resnet18", "resnet18-loaded", "smallnet"]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest, cases: dict[str, Case]) -> Case:
    return cases[request.param]


@pytest.fixture(params=WITH_LOADED)
def any_case(request: pytest.FixtureRequest, cases: dict[str, Case]) -> Case:
    return cases[request.param]


def outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


# --------------------------------------------------------------------------- the rebuilt models themselves


def test_resnet_rebuilt_as_specified(cases: dict[str, Case]) -> None:
    for name in ("resnet18", "resnet18-loaded"):
        rebuilt = cases[name].rebuilt
        assert rebuilt.get_submodule("layer1.0.conv1").out_channels == 72
        assert rebuilt.get_submodule("layer1.0.bn1").num_features == 72
        assert rebuilt.get_submodule("layer1.0.conv2").in_channels == 72
        assert rebuilt.get_submodule("layer1.0.conv2").out_channels == 64  # the residual join keeps its width
        assert rebuilt.get_submodule("fc").out_features == 10
        assert outputs(rebuilt, cases[name].inputs).shape == (2, 10)
    assert torch.equal(
        outputs(cases["resnet18-loaded"].rebuilt, cases["resnet18"].inputs),
        outputs(cases["resnet18"].rebuilt, cases["resnet18"].inputs),
    )


def test_widening_alone_keeps_the_resnet_function(cases: dict[str, Case]) -> None:
    case = cases["resnet18"]
    conv = case.original.get_submodule("layer1.0.conv1")
    widened = fxindex.replace(case.original, "layer1.0.conv1", widened_conv(conv, 72), example_inputs=case.inputs)
    torch.testing.assert_close(outputs(widened, case.inputs), outputs(case.original, case.inputs))


# --------------------------------------------------------------------------- training


def test_training_step_reaches_new_and_rebuilt_layers(any_case: Case) -> None:
    case = any_case
    model = copy.deepcopy(case.rebuilt).train()
    # A small step: random-init ResNet activations overflow in eval mode after a large one.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    parameters = dict(model.named_parameters())
    before = {name: parameters[name].detach().clone() for name in case.new_parameters}
    norm = model.get_submodule(case.rebuilt_batch_norm)
    mean_before, batches_before = norm.running_mean.clone(), int(norm.num_batches_tracked)
    inputs = tuple(x.repeat(2, 1, 1, 1) for x in case.inputs)  # >1 value per channel for BatchNorm
    logits = model(*inputs)
    targets = torch.arange(logits.shape[0]) % logits.shape[1]
    nn.functional.cross_entropy(logits, targets).backward()
    for name in case.new_parameters:
        grad = parameters[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    optimizer.step()
    for name in case.new_parameters:
        assert not torch.equal(parameters[name].detach(), before[name]), f"{name} did not change"
    # BatchNorm in train mode updated its running statistics, rebuilt at the new width.
    assert not torch.equal(norm.running_mean, mean_before)
    assert int(norm.num_batches_tracked) == batches_before + 1
    model.eval()
    mean_eval = norm.running_mean.clone()
    first = outputs(model, inputs)
    assert torch.isfinite(first).all()
    assert torch.equal(norm.running_mean, mean_eval) and torch.equal(outputs(model, inputs), first)


def test_new_input_slots_of_the_next_layer_learn(cases: dict[str, Case]) -> None:
    """The widened conv's new filters feed conv2 through zero weights; training moves those weights."""
    model = copy.deepcopy(cases["resnet18"].rebuilt).train()
    conv2 = model.get_submodule("layer1.0.conv2")
    assert torch.count_nonzero(conv2.weight[:, 64:]) == 0
    model(*cases["resnet18"].inputs).sum().backward()
    assert conv2.weight.grad[:, 64:].abs().sum() > 0


def test_dropout_differs_in_train_and_eval(cases: dict[str, Case]) -> None:
    case = cases["smallnet"]
    model = copy.deepcopy(case.rebuilt).eval()
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1  # the inserted one
    evaluated = outputs(model, case.inputs)
    assert torch.equal(evaluated, outputs(model, case.inputs))  # deterministic
    assert torch.equal(evaluated, outputs(case.original, case.inputs))  # and function-preserving in eval
    model.train()
    dropouts[0].p = 0.5
    model.get_submodule("bn").eval()  # isolate dropout: keep BatchNorm on its running statistics
    torch.manual_seed(1)
    first = outputs(model, case.inputs)
    second = outputs(model, case.inputs)
    assert dropouts[0].training and not torch.equal(first, second)
    assert not torch.equal(first, evaluated)


# --------------------------------------------------------------------------- copies and dtypes


def test_deepcopy_and_pickle_round_trip(any_case: Case) -> None:
    case = any_case
    expected = outputs(case.rebuilt, case.inputs)
    copied = copy.deepcopy(case.rebuilt)
    assert torch.equal(outputs(copied, case.inputs), expected)
    original_storages = {p.data_ptr() for p in case.rebuilt.parameters()}
    assert not original_storages & {p.data_ptr() for p in copied.parameters()}
    unpickled = pickle.loads(pickle.dumps(case.rebuilt))
    assert torch.equal(outputs(unpickled, case.inputs), expected)
    assert recipe(unpickled) == recipe(case.rebuilt) != []


def test_float64(case: Case) -> None:
    expected = outputs(case.rebuilt, case.inputs)
    model = copy.deepcopy(case.rebuilt).to(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    result = outputs(model, tuple(x.double() for x in case.inputs))
    assert result.dtype == torch.float64
    torch.testing.assert_close(result.float(), expected, rtol=1e-4, atol=1e-4)


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        conv = nn.Conv2d(3, 4, 3).to(dtype)
        bn = nn.BatchNorm2d(4).to(dtype).eval()
        bn(conv(torch.randn(1, 3, 5, 5, dtype=dtype)))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(case: Case, dtype: torch.dtype) -> None:
    if not _cpu_supports(dtype):
        pytest.skip(f"this CPU build has no {dtype} convolution kernels")
    expected = outputs(case.rebuilt, case.inputs)
    model = copy.deepcopy(case.rebuilt)
    model = model.half() if dtype == torch.float16 else model.to(dtype)
    result = outputs(model, tuple(x.to(dtype) for x in case.inputs))
    assert result.dtype == dtype and torch.isfinite(result).all()
    # Loose: half precision keeps 3 (bfloat16: 2) significant digits.
    assert (result.float() - expected).norm() <= 0.05 * expected.norm() + 1e-3


# --------------------------------------------------------------------------- torch.compile and torch.export


@pytest.mark.parametrize(
    ("name", "backend"), [("smallnet", "eager"), ("smallnet", "aot_eager"), ("resnet18", "aot_eager")]
)
def test_torch_compile(cases: dict[str, Case], name: str, backend: str) -> None:
    case = cases[name]
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(case.rebuilt), backend=backend)
    expected = outputs(case.rebuilt, case.inputs)
    torch.testing.assert_close(outputs(compiled, case.inputs), expected)


def test_torch_compile_backward_matches_eager(cases: dict[str, Case]) -> None:
    case = cases["smallnet"]
    eager = copy.deepcopy(case.rebuilt).eval()
    compiled_model = copy.deepcopy(case.rebuilt).eval()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    eager(*case.inputs).square().sum().backward()
    compiled(*case.inputs).square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_torch_compile_inductor(cases: dict[str, Case]) -> None:
    if _cxx_compiler() is None:
        pytest.skip("the default inductor backend needs a C++ compiler on CPU, and none is installed")
    case = cases["smallnet"]
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(case.rebuilt))
    expected = outputs(case.rebuilt, case.inputs)
    torch.testing.assert_close(outputs(compiled, case.inputs), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(expected, outputs(case.original, case.inputs))  # original-equivalent


def test_torch_export(any_case: Case) -> None:
    case = any_case
    program = torch.export.export(copy.deepcopy(case.rebuilt), case.inputs)
    expected = outputs(case.rebuilt, case.inputs)
    torch.testing.assert_close(outputs(program.module(), case.inputs), expected)


# --------------------------------------------------------------------------- DistributedDataParallel

WORLD_SIZE = 2
DDP_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, folder: str, results: str) -> None:
    """One rank: load the rebuilt model from its recipe, wrap it in DDP, train two steps on its own data."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the hostname resolves to
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=DDP_TIMEOUT_S)
    )
    try:
        torch.manual_seed(rank)
        model = load(SmallNet(), folder).train()
        if rank == 1:
            with torch.no_grad():  # DDP must broadcast rank 0's parameters at construction
                for parameter in model.parameters():
                    parameter.add_(1.0)
        loaded = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        losses = []
        for _ in range(2):
            x = torch.randn(4, 3, 8, 8, generator=generator)
            target = torch.randint(0, 4, (4,), generator=generator)
            loss = nn.functional.cross_entropy(ddp(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        flat = nn.utils.parameters_to_vector(model.parameters()).detach()
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        torch.save({"gathered": gathered, "loaded": loaded, "final": flat, "losses": losses}, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_two_processes(cases: dict[str, Case], tmp_path: Path) -> None:
    folder = save(cases["smallnet"].rebuilt, tmp_path / "smallnet")
    results = tmp_path / "results"
    results.mkdir()
    start = time.monotonic()
    context = mp.start_processes(
        _ddp_worker,
        args=(WORLD_SIZE, _free_port(), str(folder), str(results)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    try:
        while not context.join(timeout=max(0.1, DDP_TIMEOUT_S - (time.monotonic() - start))):
            if time.monotonic() - start > DDP_TIMEOUT_S:
                pytest.fail(f"DDP workers did not finish within {DDP_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    assert time.monotonic() - start < DDP_TIMEOUT_S
    rank0, rank1 = (torch.load(results / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE))
    assert not torch.equal(rank0["loaded"], rank1["loaded"])  # rank 1 started from other weights
    assert rank0["losses"] != rank1["losses"]  # each rank saw its own data
    for result in (rank0, rank1):
        assert torch.equal(result["gathered"][0], result["gathered"][1])  # identical parameters on both ranks
    assert torch.equal(rank0["final"], rank1["final"])
    assert not torch.equal(rank0["final"], rank0["loaded"])  # and they trained

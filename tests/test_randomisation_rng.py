"""The randomisation check's new weights come from a local CPU generator seeded from the call's ``seed``.

So a seed gives the same weights on every device, and no global generator (CPU or CUDA) is seeded, read or
advanced while the check runs: relprop is called from threads, servers and notebooks. Oracles: the layer's own
``reset_parameters`` under ``torch.manual_seed(seed)`` (in a forked RNG, in the test), and sequential runs for
concurrent ones.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from relprop.metrics import model_parameter_randomisation
from relprop.metrics.randomisation import _randomise

CUDA = torch.cuda.is_available()


def _global_states() -> tuple:
    cuda = tuple(torch.cuda.get_rng_state_all()) if CUDA else ()
    return torch.get_rng_state(), torch.initial_seed(), cuda


def _same_states(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and len(a[2]) == len(b[2]) and all(map(torch.equal, a[2], b[2]))


class Probe(nn.Module):
    """A layer whose ``reset_parameters`` draws with a tensor method, a torch function and ``nn.init``, and
    notes the global generators' state it sees while it does (in ``SEEN``: a class attribute, shared by the
    check's copies)."""

    SEEN: list[tuple] = []

    def __init__(self, n: int = 6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def reset_parameters(self) -> None:
        Probe.SEEN.append(_global_states())
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.add_(torch.rand(self.weight.shape))
            nn.init.normal_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _gradient(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.gather(1, t.view(-1, 1)).sum(), x)
    return g


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Probe(6), nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3)).eval()


def test_no_global_generator_is_seeded_read_or_advanced():
    model = _model()
    x = torch.randn(5, 6)
    torch.manual_seed(1234)
    torch.rand(3)  # a state that is not a fresh seed's
    before = _global_states()
    Probe.SEEN.clear()
    model_parameter_randomisation(model, x, _gradient, torch.tensor([0, 1, 2, 0, 1]), seed=3)
    after = _global_states()
    assert _same_states(before, after)
    # while the layer re-initialised itself (on the check's copy), the global generators were the caller's
    assert len(Probe.SEEN) == 1 and _same_states(Probe.SEEN[0], before), "reset_parameters saw a reseeded generator"


def _oracle(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``module``'s parameters re-initialised by its own ``reset_parameters`` under ``torch.manual_seed``."""
    import copy

    ref = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        ref.reset_parameters()
    return {k: v.detach().clone() for k, v in ref.named_parameters()}


@pytest.mark.parametrize("make", [lambda: nn.Linear(7, 5), lambda: nn.Conv2d(3, 4, 3), lambda: Probe(9)])
def test_weights_are_reset_parameters_drawn_from_the_seed(make):
    torch.manual_seed(0)
    module = make()
    for p in module.parameters():  # nothing left at a value that the reset gives anyway
        p.data.normal_()
    expected = _oracle(module, 17)
    _randomise(module, 17)
    for k, v in module.named_parameters():
        assert torch.equal(v, expected[k]), k


def test_deterministic_resets_and_plain_parameters_get_normal_draws_from_the_seed():
    norm = nn.LayerNorm(8)  # reset_parameters gives 1 / 0: redrawn N(0, 1)
    _randomise(norm, 5)
    gen = torch.Generator().manual_seed(5)
    w = torch.empty(8).normal_(0.0, 1.0, generator=gen)
    b = torch.empty(8).normal_(0.0, 1.0, generator=gen)
    assert torch.equal(norm.weight, w) and torch.equal(norm.bias, b)

    class Plain(nn.Module):  # no reset_parameters: N(0, std of the parameter)
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.arange(6.0))

    plain = Plain()
    std = float(plain.scale.detach().std())
    _randomise(plain, 5)
    assert torch.equal(plain.scale, torch.empty(6).normal_(0.0, std, generator=torch.Generator().manual_seed(5)))


def _run(seed: int) -> torch.Tensor:
    model = _model()
    torch.manual_seed(99)
    x = torch.randn(6, 6)
    return model_parameter_randomisation(model, x, _gradient, seed=seed).similarity


def test_same_seed_same_result_other_seed_other_result():
    assert torch.equal(_run(3), _run(3))
    assert not torch.equal(_run(3), _run(4))


def test_concurrent_threads_give_the_sequential_results():
    seeds = [3, 4, 5]
    sequential = {s: _run(s) for s in seeds}
    # models and inputs made before the threads start (the test's own draws use the global generator)
    models = {s: _model() for s in seeds}
    torch.manual_seed(99)
    x = torch.randn(6, 6)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(seeds) + 1)
    stop = threading.Event()

    def check(seed: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                sim = model_parameter_randomisation(models[seed], x, _gradient, seed=seed).similarity
                if seed in results:
                    assert torch.equal(sim, results[seed])
                results[seed] = sim
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    def draw_globally() -> None:  # another thread using the global generator meanwhile
        gen_seq = torch.Generator().manual_seed(7)
        torch.manual_seed(7)
        start.wait()
        while not stop.is_set():
            if not torch.equal(torch.rand(4), torch.rand(4, generator=gen_seq)):
                errors.append(AssertionError("the global generator's sequence was disturbed"))
                return

    threads = [threading.Thread(target=check, args=(s,)) for s in seeds]
    drawer = threading.Thread(target=draw_globally)
    for t in [*threads, drawer]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    drawer.join()
    assert not errors, errors
    for s in seeds:
        assert torch.equal(results[s], sequential[s]), s


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_cuda_weights_equal_the_cpu_weights_and_cuda_generator_untouched():
    torch.manual_seed(0)
    for make in (lambda: nn.Linear(7, 5), lambda: nn.LayerNorm(8), lambda: Probe(9)):
        cpu = make()
        gpu = make().cuda()
        gpu.load_state_dict(cpu.state_dict())
        before = _global_states()
        _randomise(cpu, 21)
        _randomise(gpu, 21)
        assert _same_states(before, _global_states())
        for (k, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
            assert b.device.type == "cuda" and torch.equal(a, b.cpu()), k

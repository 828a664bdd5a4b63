"""The CUDA look-alike of tests/fake_cuda.py: it reports cuda, refuses what CUDA refuses, trains
with the same numbers as the CPU, pins, autocasts, saves, restores everything on exit, and runs
scripts from the command line."""
from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fake_cuda import FakeCudaTensor, fake_cuda, fake_cuda_device  # noqa: F401 (fixture)

HERE = Path(__file__).resolve().parent
SAME_DEVICE = "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"


def cuda(*shape: int, **kwargs) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", **kwargs)


def saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# ----------------------------------------------------------------------------- what it reports

def test_torch_cuda_and_accelerator_answer_for_one_device(fake_cuda_device):
    assert fake_cuda_device == torch.device("cuda", 0)
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1 and torch.cuda.current_device() == 0
    assert torch.accelerator.is_available() and torch.accelerator.current_accelerator().type == "cuda"
    torch.cuda.set_device(0)
    torch.cuda.set_device(torch.device("cuda", 0))
    torch.cuda.synchronize()
    torch.cuda.manual_seed(1)
    torch.cuda.manual_seed_all(1)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.memory_allocated() == torch.cuda.max_memory_allocated() == 0
    assert torch.cuda.is_bf16_supported() and torch.cuda.is_initialized()
    assert isinstance(torch.cuda.get_device_name(0), str)
    assert torch.cuda.get_device_properties(0).total_memory > 0
    with torch.cuda.device(0):
        assert not torch.cuda.current_stream().is_capturing()
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.cuda.set_device(1)


def test_a_cuda_tensor_looks_like_one(fake_cuda_device):
    t = torch.arange(3.0).to("cuda")
    assert isinstance(t, FakeCudaTensor) and t.device == torch.device("cuda", 0)
    assert t.is_cuda and not t.is_cpu and t.get_device() == 0 and t.type() == "torch.cuda.FloatTensor"
    assert repr(t) == "tensor([0., 1., 2.], device='cuda:0')"
    assert repr(nn.Linear(1, 1).cuda().weight).startswith("Parameter containing:\ntensor([[")
    assert t.tolist() == [0.0, 1.0, 2.0] and t.sum().item() == 3.0 and f"{t.sum():.1f}" == "3.0"


@pytest.mark.parametrize("make", [
    lambda: torch.ones(2).to("cuda"),
    lambda: torch.ones(2).to("cuda:0"),
    lambda: torch.ones(2).to(0),
    lambda: torch.ones(2).to(device=torch.device("cuda", 0)),
    lambda: torch.ones(2).to(torch.device("cuda"), torch.float64),
    lambda: torch.ones(2).to(torch.zeros(1, device="cuda")),
    lambda: torch.load(saved(torch.ones(2)), map_location=torch.device("cuda"), weights_only=True),
    lambda: torch.ones(2).cuda(),
    lambda: torch.zeros(2, device="cuda"),
    lambda: torch.ones(2, device=torch.device("cuda", 0)),
    lambda: torch.full((2,), 1.0, device="cuda"),
    lambda: torch.empty(2, device="cuda"),
    lambda: torch.arange(2, device="cuda"),
    lambda: torch.tensor([1.0, 2.0], device="cuda"),
    lambda: torch.as_tensor(np.ones(2), device="cuda"),
    lambda: torch.randn(2, device="cuda"),
    lambda: torch.randperm(2, device="cuda"),
    lambda: torch.eye(2, device="cuda"),
    lambda: torch.linspace(0, 1, 2, device="cuda"),
    lambda: torch.zeros_like(torch.ones(2), device="cuda"),
    lambda: torch.ones(2, device="cuda").new_tensor([1.0, 2.0]),
    lambda: torch.ones(2, device="cuda").new_zeros(2),
])
def test_moves_and_factories_land_on_cuda(fake_cuda_device, make):
    assert make().device == torch.device("cuda", 0)


def test_moves_copy_and_cpu_gives_plain_tensors(fake_cuda_device):
    src = torch.zeros(2)
    t = src.to("cuda")
    t.add_(1)
    assert src.sum() == 0  # a copy, not a view of the cpu tensor
    assert t.to("cuda") is t and t.cuda() is t
    back = t.cpu()
    assert type(back) is torch.Tensor and back.device.type == "cpu" and back.tolist() == [1.0, 1.0]
    assert type(t.to("cpu", torch.float64)) is torch.Tensor
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.ones(1).to("cuda:1")


def test_module_to_cuda_keeps_parameters_and_optimizer(fake_cuda_device):
    model = nn.Linear(3, 2)
    weight = model.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # made before the move, as scripts do
    model.to("cuda")
    assert model.weight is weight and isinstance(weight, nn.Parameter) and weight.device.type == "cuda"
    model(cuda(4, 3)).sum().backward()
    before = weight.detach().cpu().clone()
    optimizer.step()
    assert not torch.equal(before, weight.detach().cpu())
    assert model.cpu().weight.device.type == "cpu"


def test_moves_are_differentiable_both_ways(fake_cuda_device):
    cpu_leaf = torch.ones(3, requires_grad=True)
    (cpu_leaf.cuda() * 2).sum().backward()  # a cuda loss reaches a cpu leaf
    assert type(cpu_leaf.grad) is torch.Tensor and cpu_leaf.grad.tolist() == [2.0, 2.0, 2.0]
    cuda_leaf = torch.ones(3, device="cuda", requires_grad=True)
    (cuda_leaf.cpu() * 3).sum().backward()  # a cpu loss reaches a cuda leaf
    assert cuda_leaf.grad.device.type == "cuda" and cuda_leaf.grad.tolist() == [3.0, 3.0, 3.0]
    dst = torch.zeros(3, device="cuda")
    dst.copy_(cpu_leaf * 1)  # copy_ across devices is differentiable too
    cpu_leaf.grad = None
    dst.sum().backward()
    assert cpu_leaf.grad.tolist() == [1.0, 1.0, 1.0]


def test_composite_ops_and_unused_outputs(fake_cuda_device):
    ids = torch.tensor([0, 2], device="cuda")
    # one_hot builds its zeros from the input's options (cpu in C++): they must be cuda ones
    assert F.one_hot(ids, 3).device.type == "cuda"
    weights = cuda(4, 6, requires_grad=True)
    # backward makes cpu zeros for the unused chunk / row / LSTM outputs: tolerated there
    losses = [weights.chunk(2, 1)[0].sum(), weights.unbind(0)[1].sum(),
              nn.LSTM(6, 3).cuda()(weights.unsqueeze(1))[0].sum(),
              F.cross_entropy(weights, torch.tensor([0, 1, 2, 3], device="cuda"), label_smoothing=0.1)]
    for loss in losses:
        weights.grad = None
        loss.backward()
        assert weights.grad.device.type == "cuda"
    twin = copy.deepcopy(nn.Linear(2, 2).cuda())
    assert twin.weight.device.type == "cuda" and isinstance(twin.weight, nn.Parameter)


# ----------------------------------------------------------------------------- what it refuses

@pytest.mark.parametrize("op", [
    lambda: torch.mm(cuda(2, 3), torch.randn(3, 2)),
    lambda: nn.Embedding(10, 4).to("cuda")(torch.tensor([1, 2])),  # the CLIP token_embedding bug
    lambda: torch.cat([cuda(2), torch.randn(2)]),
    lambda: torch.index_select(cuda(3), 0, torch.tensor([0])),
    lambda: cuda(3) + torch.randn(3),
    lambda: torch.randn(3) * torch.tensor(2.0, device="cuda"),  # a 0-dim cuda tensor is no scalar for cpu
    lambda: torch.randn(3).add_(cuda(3)),
    lambda: F.cross_entropy(cuda(2, 4), torch.tensor([0, 1])),
    lambda: F.one_hot(torch.tensor([0, 1]), 4) * cuda(2, 4),
    lambda: nn.Linear(3, 2).cuda()(torch.randn(1, 3)),
    lambda: cuda(3).__setitem__(torch.tensor([0, 1]), torch.ones(2)),  # values must be on cuda
])
def test_mixing_devices_raises(fake_cuda_device, op):
    with pytest.raises(RuntimeError, match=SAME_DEVICE):
        op()


def test_a_cuda_index_may_not_index_a_cpu_tensor(fake_cuda_device):
    with pytest.raises(RuntimeError, match="indices should be either on cpu or on the same device"):
        torch.randn(3)[torch.tensor([0], device="cuda")]


def test_legal_mixes_run(fake_cuda_device):
    t = torch.arange(4.0, device="cuda")
    assert (t + torch.tensor(1.0)).tolist() == [1.0, 2.0, 3.0, 4.0]  # 0-dim cpu tensor: a scalar
    assert (t * 2).device.type == "cuda" and torch.where(t > 1, t, torch.tensor(0.0)).device.type == "cuda"
    assert t[torch.tensor([0, 3])].tolist() == [0.0, 3.0]  # cpu index into cuda
    t[torch.tensor([0])] = torch.tensor(9.0)
    t.index_put_((torch.tensor([1]),), torch.ones(1, device="cuda"))
    assert t.masked_fill(t > 8, torch.tensor(-1.0)).tolist() == [-1.0, 1.0, 2.0, 3.0]
    host = torch.zeros(4)
    host.copy_(t)
    t.copy_(torch.zeros(4))
    assert host.tolist() == [9.0, 1.0, 2.0, 3.0] and t.sum().item() == 0


def test_numpy_of_a_cuda_tensor_raises(fake_cuda_device):
    t = torch.ones(2, device="cuda")
    message = "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy"
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        t.numpy()
    with pytest.raises(TypeError, match="can't convert cuda:0"):
        np.asarray(t)
    assert t.cpu().numpy().tolist() == [1.0, 1.0]


class Items(torch.utils.data.Dataset):
    """Four items made by `make(i)`."""

    def __init__(self, make):
        self.make = make

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return self.make(i)


@pytest.mark.parametrize("make", [
    lambda held: (lambda i: held),                                # made in the main process
    lambda held: (lambda i: torch.zeros(2, device="cuda")),       # made in the worker
    lambda held: (lambda i: held * 2),                            # used in the worker
], ids=["returned", "created", "used"])
def test_cuda_in_a_forked_worker_raises(fake_cuda_device, make):
    loader = torch.utils.data.DataLoader(Items(make(torch.ones(2, device="cuda"))), batch_size=2, num_workers=1)
    with pytest.raises(RuntimeError, match="Cannot re-initialize CUDA in forked subprocess"):
        next(iter(loader))


def test_pin_memory(fake_cuda_device):
    pinned = torch.ones(3).pin_memory()
    assert type(pinned) is torch.Tensor and pinned.is_pinned() and pinned[1:].is_pinned()
    assert not torch.ones(3).is_pinned()
    with pytest.raises(RuntimeError, match="cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors can be pinned"):
        torch.ones(3, device="cuda").pin_memory()
    loader = torch.utils.data.DataLoader(Items(lambda i: (torch.full((2,), float(i)), i)), batch_size=2,
                                         num_workers=1, pin_memory=True)  # pins in its own thread
    for images, labels in loader:
        assert images.is_pinned() and labels.is_pinned()
        assert images.to("cuda", non_blocking=True).device.type == "cuda"


def test_zero_devices_is_a_machine_without_gpu():
    with fake_cuda(devices=0) as device:
        assert device is None and not torch.cuda.is_available() and torch.cuda.device_count() == 0
        for act in (lambda: torch.ones(1).to("cuda"), lambda: torch.ones(1).cuda(), lambda: nn.Linear(1, 1).cuda(),
                    lambda: torch.zeros(1, device="cuda"), lambda: torch.ones(1).pin_memory()):
            with pytest.raises(RuntimeError, match="No CUDA GPUs are available"):
                act()
        with pytest.warns(UserWarning, match="CUDA is not available"):
            assert not torch.amp.GradScaler("cuda").is_enabled()


# ----------------------------------------------------------------------------- training

class Net(nn.Module):
    """conv + batchnorm + embedding + dropout + linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.emb, self.drop, self.fc = nn.Embedding(5, 4), nn.Dropout(0.2), nn.Linear(4, 5)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(images))).mean((2, 3))
        return self.fc(self.drop(h + self.emb(ids)))


def train(device: str, steps: int = 3, amp: bool = False, inf_at: int | None = None):
    """A few Adam steps from a fixed seed; the loss is taken on the cpu."""
    torch.manual_seed(0)
    net = Net().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, enabled=amp)
    data = torch.Generator().manual_seed(1)
    losses, skipped = [], []
    for step in range(steps):
        images, ids = torch.randn(6, 3, 8, 8, generator=data), torch.randint(0, 5, (6,), generator=data)
        labels = torch.randint(0, 5, (6,), generator=data)
        with torch.autocast(device_type=device, dtype=torch.float16, enabled=amp):
            logits = net(images.to(device), ids.to(device))
        loss = F.cross_entropy(logits.float().cpu(), labels)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if step == inf_at:
            net.fc.weight.grad[0, 0] = float("inf")
        before = [p.detach().cpu().clone() for p in net.parameters()]
        scaler.step(optimizer)
        scaler.update()
        skipped.append(all(torch.equal(b, p.detach().cpu()) for b, p in zip(before, net.parameters())))
        losses.append(loss.item())
    return net, optimizer, scaler, losses, skipped, logits.dtype


def test_training_on_cuda_gives_the_cpu_numbers():
    cpu_net, _, _, cpu_losses, _, _ = train("cpu")
    with fake_cuda():
        net, _, _, losses, _, _ = train("cuda")
        assert all(p.device.type == "cuda" for p in net.parameters())
        state = {k: v.cpu() for k, v in net.state_dict().items()}
    # the same CPU kernels on the same inputs: bit-identical
    assert losses == cpu_losses
    for key, value in cpu_net.state_dict().items():
        assert torch.equal(state[key], value), key


def test_float16_autocast_and_grad_scaler(fake_cuda_device):
    with torch.autocast("cuda"):
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16
        assert (cuda(2, 2) @ cuda(2, 2)).dtype == torch.float16
    with torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16):
        assert (cuda(2, 2) @ cuda(2, 2)).dtype == torch.bfloat16
    _, _, scaler, losses, skipped, dtype = train("cuda", amp=True, inf_at=1)
    assert dtype == torch.float16 and all(np.isfinite(losses))
    assert skipped == [False, True, False]  # the step with an inf gradient was skipped...
    assert scaler.get_scale() == 2.0 ** 15  # ...and the scale halved
    again = torch.amp.GradScaler("cuda")
    again.load_state_dict(scaler.state_dict())
    assert again.get_scale() == scaler.get_scale()


# ----------------------------------------------------------------------------- checkpoints

def test_state_dicts_save_as_plain_cpu_tensors(tmp_path):
    with fake_cuda():
        net, optimizer, *_ = train("cuda", steps=2)
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
        to_cuda = torch.load(tmp_path / "ckpt.pt", map_location="cuda", weights_only=True)
        assert to_cuda["model"]["fc.weight"].device.type == "cuda"
        # a fresh model and optimizer resume from it; Optimizer.load_state_dict moves state to cuda
        net2 = Net().cuda()
        net2.load_state_dict(to_cuda["model"])
        optimizer2 = torch.optim.Adam(net2.parameters(), lr=1e-2)
        optimizer2.load_state_dict(torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["optimizer"])
        assert optimizer2.state[net2.fc.weight]["exp_avg"].device.type == "cuda"
        net2(cuda(2, 3, 8, 8), torch.tensor([0, 1], device="cuda")).sum().backward()
        optimizer2.step()
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert all(type(v) is torch.Tensor for v in ckpt["model"].values())
    assert all(type(v) is torch.Tensor for s in ckpt["optimizer"]["state"].values() for v in s.values())
    again = torch.load(saved(ckpt["model"]), weights_only=True)  # and saves again as it loaded
    assert all(torch.equal(again[k], v) for k, v in ckpt["model"].items())


# ----------------------------------------------------------------------------- restoring, command line

def test_everything_is_restored_on_exit():
    originals = (torch.cuda.is_available, torch.load, torch.Tensor.pin_memory, torch.autocast.__init__,
                 torch.accelerator.current_device_index, torch._has_compatible_shallow_copy_type)
    had_cuda = torch.cuda.is_available()
    with pytest.raises(ZeroDivisionError):
        with fake_cuda():
            with pytest.raises(RuntimeError, match="already active"):
                with fake_cuda():
                    pass
            1 / 0
    assert (torch.cuda.is_available, torch.load, torch.Tensor.pin_memory, torch.autocast.__init__,
            torch.accelerator.current_device_index, torch._has_compatible_shallow_copy_type) == originals
    assert "pin_memory" not in torch.Tensor.__dict__  # inherited again, not a copy
    assert torch.overrides._get_current_function_mode_stack() == []
    assert torch.cuda.is_available() == had_cuda
    if not had_cuda:
        with pytest.raises((RuntimeError, AssertionError)):  # no driver / not compiled with CUDA
            torch.zeros(1).to("cuda")


def test_command_line_runs_a_script_under_it(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import sys
        import torch
        assert torch.cuda.is_available()
        loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, num_workers=1, pin_memory=True)
        batches = [b.to("cuda") for b in loader]
        print(batches[0].device, sys.argv[1:])
        if __name__ == "__main__":
            sys.exit(3)
    """))
    done = subprocess.run([sys.executable, str(HERE / "fake_cuda.py"), str(script), "arg"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == "cuda:0 ['arg']"

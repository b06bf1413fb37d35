"""What this machine does fast: bf16 or fp32 training, and how many images a time budget buys.

    use_bf16, reason = choose_bf16("cpu", requested=None)     # None: decide from the CPU
    images_per_s = training_throughput(model, (3, 32, 32), batch_size=128, bf16=use_bf16)

bf16 autocast on a CPU is only faster where the CPU has bf16 arithmetic (x86: avx512_bf16 or
amx_bf16; Arm: the bf16 feature). Elsewhere oneDNN emulates it and it is slower than fp32 —
measured on an Intel Xeon with avx512_vnni but no avx512_bf16/AMX: one VGG-16 training step at
batch 128 took 1.61 s in fp32 and 3.66 s in bf16 (2.3x slower), while
`torch.ops.mkldnn._is_mkldnn_bf16_supported()` still answered True. So the flags decide, not
that call; `--bf16` / `--no-bf16` always win.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Optional

BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}   # x86 AVX-512 BF16, x86 AMX-BF16, Arm FEAT_BF16


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (x86 "flags", Arm "Features"); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def choose_bf16(device: str, requested: Optional[bool]) -> tuple[bool, str]:
    """(use bf16 autocast?, why) for training on `device`."""
    if requested is not None:
        return requested, f"--{'bf16' if requested else 'no-bf16'} given"
    if device.startswith("cuda"):
        import torch
        ok = torch.cuda.is_bf16_supported()
        return ok, "the GPU supports bf16" if ok else "the GPU has no bf16 support"
    have = sorted(cpu_flags() & BF16_FLAGS)
    if have:
        return True, f"the CPU has bf16 arithmetic ({', '.join(have)})"
    return False, (f"the CPU ({platform.machine()}) has no bf16 arithmetic (no avx512_bf16/amx_bf16/bf16 flag): "
                   f"bf16 autocast would be emulated and slower than fp32")


def training_throughput(model, input_chw: tuple, batch_size: int, bf16: bool, channels_last: bool = True,
                        steps: int = 4, device: str = "cpu", warmup: int = 2) -> float:
    """Training images per second of `model` (forward, backward, SGD step) on random data: the median
    of `steps` timed steps after `warmup` untimed ones (oneDNN builds its kernels on the first steps;
    the median ignores a step stalled by other work on a shared host). An estimate to size work by,
    not a benchmark."""
    import copy
    from contextlib import nullcontext

    import torch
    from torch import nn

    net = copy.deepcopy(model).to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, *input_chw, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        classes = net(x[:1]).shape[1]
    y = torch.randint(0, classes, (batch_size,), device=device)
    ctx = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if bf16 else nullcontext
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        with ctx():
            loss = loss_fn(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return batch_size / statistics.median(times)

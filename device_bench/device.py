"""Who ran the benchmark: the board, its CPU, OS, Python, and the state that skews latency
(frequency governor, temperature, throttling). Stdlib only; every probe is best-effort and a
field is None when this system does not expose it."""
from __future__ import annotations

import glob
import os
import platform
import shutil
import socket
import subprocess
from typing import Any, Dict, Optional

# ARM cores by the "CPU part" number in /proc/cpuinfo (aarch64 kernels print no model name).
ARM_PARTS = {"0xb76": "ARM1176", "0xc07": "Cortex-A7", "0xc08": "Cortex-A8", "0xc09": "Cortex-A9",
             "0xc0f": "Cortex-A15", "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55",
             "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75",
             "0xd0b": "Cortex-A76", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd44": "Cortex-X1",
             "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd4d": "Cortex-A715"}


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def cpu_model() -> Optional[str]:
    info = _read("/proc/cpuinfo") or ""
    fields: Dict[str, str] = {}
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    for key in ("model name", "Processor", "cpu model"):
        if fields.get(key):
            return fields[key]
    part = fields.get("CPU part")
    if part:
        return ARM_PARTS.get(part.lower(), f"ARM CPU part {part}")
    return platform.processor() or None


def board_model() -> Optional[str]:
    """The board as the firmware names it (a Pi: 'Raspberry Pi 4 Model B Rev 1.4')."""
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        v = _read(path)
        if v:
            return v
    vendor, product = _read("/sys/class/dmi/id/sys_vendor"), _read("/sys/class/dmi/id/product_name")
    named = " ".join(v for v in (vendor, product) if v)
    return named or None


def os_name() -> str:
    text = _read("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return f"{platform.system()} {platform.release()}".strip()


def memory_total_mb() -> Optional[float]:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def cpu_frequency() -> Dict[str, Any]:
    base = "/sys/devices/system/cpu/cpu0/cpufreq/"

    def mhz(name: str) -> Optional[float]:
        v = _read(base + name)
        return round(int(v) / 1000, 1) if v and v.isdigit() else None

    return {"governor": _read(base + "scaling_governor"), "cur_mhz": mhz("scaling_cur_freq"),
            "max_mhz": mhz("scaling_max_freq")}


def temperatures() -> Dict[str, float]:
    """{zone type: degrees C} for every readable thermal zone."""
    temps: Dict[str, float] = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        raw = _read(os.path.join(zone, "temp"))
        if raw is None or not raw.lstrip("-").isdigit():
            continue
        kind = _read(os.path.join(zone, "type")) or os.path.basename(zone)
        key, n = kind, 2
        while key in temps:
            key, n = f"{kind}#{n}", n + 1
        temps[key] = round(int(raw) / 1000, 1)
    return temps


def max_temperature() -> Optional[float]:
    temps = temperatures()
    return max(temps.values()) if temps else None


def pi_throttled() -> Optional[str]:
    """A Raspberry Pi's `vcgencmd get_throttled` flags (non-zero = under-voltage or throttling seen)."""
    exe = shutil.which("vcgencmd")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=3)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text.split("=", 1)[1] if out.returncode == 0 and "=" in text else None


# Architecture families: a 32-bit userspace on a 64-bit kernel of the same family is native.
_ARCH_FAMILIES = {"x86": ("x86_64", "amd64", "i386", "i486", "i586", "i686"),
                  "arm": ("aarch64", "arm64", "armv6l", "armv7l", "armv8l", "armv8b", "arm")}


def _arch_family(machine: str) -> str:
    m = machine.lower()
    return next((family for family, names in _ARCH_FAMILIES.items() if m in names), m)


def emulation(machine: str, kernel_arch: Optional[str], cpuinfo: str) -> Optional[str]:
    """How this Python is emulated, or None when it runs natively. qemu-user (binfmt) runs, say,
    aarch64 programs on an x86-64 kernel: uname and platform.machine() report the emulated
    machine, but the kernel's own /proc/sys/kernel/arch and /proc/cpuinfo still describe the host.
    Latency measured this way says nothing about a real board."""
    if kernel_arch and _arch_family(kernel_arch) != _arch_family(machine):
        return f"qemu-user: {machine} programs on an {kernel_arch} kernel"
    x86_cpuinfo = any(line.startswith(("vendor_id", "flags")) for line in cpuinfo.splitlines())
    if _arch_family(machine) != "x86" and x86_cpuinfo:  # kernels without /proc/sys/kernel/arch
        return f"qemu-user: {machine} programs on an x86 CPU (/proc/cpuinfo)"
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe() -> Dict[str, Any]:
    """The `device` object of a report (device_bench/README.md)."""
    emulated = emulation(platform.machine(), _read("/proc/sys/kernel/arch"), _read("/proc/cpuinfo") or "")
    return {
        "hostname": socket.gethostname(),
        "board": board_model(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "machine": platform.machine(),
        "memory_mb": memory_total_mb(),
        "os": os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "cpufreq": cpu_frequency(),
        "temperature_c": temperatures(),
        "throttled": pi_throttled(),
        "emulated": emulated is not None,
        "emulation": emulated,
    }

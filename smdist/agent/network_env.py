"""The network environment large jobs need, as the SageMaker PyTorch toolkit gives it.

``NCCL_SOCKET_IFNAME`` from resourceconfig.json's ``network_interface_name``; and when the
host has EFA devices, libfabric's EFA provider (``FI_PROVIDER=efa``), GPUDirect RDMA where
the device supports it (``FI_EFA_USE_DEVICE_RDMA=1``) and ``RDMAV_FORK_SAFE=1``. EFA is
detected from the system (``/sys/class/infiniband/*`` bound to the ``efa`` driver), not from
a list of instance types: the toolkit's list missed new instance types and their jobs fell
back to TCP sockets. A variable the user set is never overridden.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from smdist.config import JobConfig
from smdist.records import dataclass

# PCI device ids of EFA generations: the first (0xefa0, p3dn/c5n) has no RDMA read; later
# ones (0xefa1 p4d, 0xefa2 p5, ...) do, and NCCL's GPUDirect RDMA over EFA needs it.
_EFA_WITHOUT_RDMA = ("0xefa0",)


@dataclass(frozen=True)
class EfaDevice:
    name: str
    pci_device: str

    @property
    def rdma(self) -> bool:
        return self.pci_device not in _EFA_WITHOUT_RDMA


def efa_devices(sysfs: Path = Path("/sys")) -> list[EfaDevice]:
    """The InfiniBand devices whose kernel driver is ``efa``."""
    root = sysfs / "class" / "infiniband"
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    found = []
    for dev in entries:
        try:
            driver = os.path.basename(os.readlink(dev / "device" / "driver"))
        except OSError:
            continue
        if driver != "efa":
            continue
        try:
            pci = (dev / "device" / "device").read_text().strip().lower()
        except OSError:
            pci = ""
        found.append(EfaDevice(dev.name, pci))
    return found


@dataclass(frozen=True)
class NetworkEnvironment:
    variables: Mapping[str, str]
    """What smdist would set (a worker gets each one unless the user set it)."""
    kept: tuple[str, ...]
    """Names the user set themselves (never overridden)."""
    efa: tuple[EfaDevice, ...]

    def describe(self) -> str:
        parts = [", ".join(sorted(self.variables)) or "nothing"]
        if self.kept:
            parts.append(f"kept your {', '.join(sorted(self.kept))}")
        if self.efa:
            names = ", ".join(d.name for d in self.efa)
            rdma = "with" if all(d.rdma for d in self.efa) else "without"
            parts.append(f"EFA: {len(self.efa)} device(s) ({names}), {rdma} RDMA")
        else:
            parts.append("no EFA devices")
        return "; ".join(parts)


def network_environment(
    config: JobConfig, environ: Mapping[str, str], sysfs: Path = Path("/sys")
) -> NetworkEnvironment:
    wanted: dict[str, str] = {}
    if "network_interface_name" in config.resource.raw:  # a default would not exist off SageMaker
        wanted["NCCL_SOCKET_IFNAME"] = config.resource.network_interface_name
    efa = efa_devices(sysfs)
    if efa:
        wanted["FI_PROVIDER"] = "efa"
        wanted["RDMAV_FORK_SAFE"] = "1"
        if all(d.rdma for d in efa):
            wanted["FI_EFA_USE_DEVICE_RDMA"] = "1"
    kept = tuple(k for k in wanted if k in environ)
    return NetworkEnvironment(
        {k: v for k, v in wanted.items() if k not in environ}, kept, tuple(efa)
    )

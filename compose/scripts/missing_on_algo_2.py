"""A dependency that only algo-2 needs, and that algo-2 does not have.

algo-1's rank joins the process group and waits in a barrier; algo-2's rank imports a
module that is not installed before it gets there (the seed's ``some_missing_library``).
"""

from __future__ import annotations

import os

import torch.distributed as dist

if os.environ["SM_CURRENT_HOST"] == "algo-2":
    import some_missing_library  # noqa: F401

dist.init_process_group("gloo")
dist.barrier()

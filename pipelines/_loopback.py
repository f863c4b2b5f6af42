"""Keep the two servers that ignore RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 on 127.0.0.1 (docs/architecture.md, platform notes).

* torch's rank-0 rendezvous TCPStore (Ray Train's process group) binds `*:<port>`; there is no setting.
* a Ray Serve replica's internal gRPC server binds `[::]:0` (hard-coded in ray/serve/_private/replica.py).

Install in every Ray worker process through the runtime_env hook (workers import the installed package):

    ray.init(..., runtime_env={"worker_process_setup_hook": "pipelines._loopback.install"})

`install()` patches lazily: a module that is already imported is patched at once, otherwise right after it
is first imported, so a worker that never touches torch or Serve (Ray Data tasks, the Train controller)
does not pay for importing them. This is not a stage: it holds no pipeline logic, only the two patches.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import socket
import sys
from collections.abc import Callable
from typing import Any

_KEEP: list[socket.socket] = []  # listening sockets handed to TCPStore: they must outlive the store


def patch_tcpstore(rdv: Any) -> None:
    """Make rank 0's TCPStore listen on 127.0.0.1 only (torch.distributed.rendezvous module given)."""
    if getattr(rdv._create_c10d_store, "_loopback", False):
        return
    orig = rdv._create_c10d_store

    def create(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or rdv._torchelastic_use_agent_store():
            return orig(hostname, port, rank, world_size, timeout, use_libuv)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        _KEEP.append(s)
        # The store serves on the socket we bound ourselves, so it never opens its own `*:<port>` listener.
        return rdv.TCPStore(
            host_name=hostname,
            port=port,
            world_size=world_size,
            is_master=True,
            timeout=timeout,
            multi_tenant=True,
            master_listen_fd=s.fileno(),
            use_libuv=use_libuv,
        )

    create._loopback = True  # type: ignore[attr-defined]
    rdv._create_c10d_store = create


def patch_serve_replica(replica: Any) -> None:
    """Make a Serve replica's inter-deployment gRPC server bind 127.0.0.1 instead of `[::]`."""
    orig = replica.add_port_to_grpc_server
    if getattr(orig, "_loopback", False):
        return

    def patched(server, address):
        return orig(server, address.replace("[::]", "127.0.0.1", 1))

    patched._loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = patched


_PATCHES: dict[str, Callable[[Any], None]] = {
    "torch.distributed.rendezvous": patch_tcpstore,
    "ray.serve._private.replica": patch_serve_replica,
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of a watched module so the patch runs after it executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, _PATCHES[fullname])
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, patch: Callable[[Any], None]) -> None:
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.patch(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.inner, name)


def install() -> None:
    """Patch every watched module now if imported, else when it is first imported. Idempotent."""
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())

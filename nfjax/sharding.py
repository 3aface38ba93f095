"""Meshes and shardings. The one place that knows device axes.

The mesh comes from `config.mesh` ({data, fsdp, model}: sizes, -1 fills the remaining devices).
Arrays are annotated with *logical* axis names; `LOGICAL_RULES` maps them to mesh axes, so models,
fitters and stages name logical axes ('fields', 'batch', ...) and only this module and the config
checks (nfjax/configs/checks.py: the batch must divide data x fsdp) know the mesh axes
(MaxText / big_vision style).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from typing import Sequence

import jax
import numpy as np

from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
try:  # private: the only way to choose gloo's address (cpu_collectives_on_loopback)
  from jax._src import distributed as _jax_distributed, xla_bridge as _xla_bridge
  from jax._src.lib import _jax as _jaxlib
except ImportError:  # pragma: no cover - another JAX layout
  _jaxlib = None

from nfjax.errors import ConfigError, NfjaxError
from nfjax.utils.logging import log

MESH_AXES = ('data', 'fsdp', 'model')
_WARNED: set = set()
CPU_DEVICES_MAX = 8
_PER_CORE_CPU = False  # set by split_cpu: this process's CPU devices are one per core
_THIS_PROCESS = False  # inside this_process_only: meshes use this process's devices only

# logical axis -> mesh axes (None = replicated).
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    'fields': ('data', 'fsdp', 'model'),  # a stack of independent neural fields: use every device
    'batch': ('data', 'fsdp'),
    'embed': 'fsdp',
    'mlp': 'model',
    'heads': 'model',
    'kv': None,
    'vocab': 'model',
    'layers': None,   # the stacked-layer axis of a scanned transformer
    'norm': None,     # LayerNorm scales/biases: small, replicated
    'classes': None,
}


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def auto_cpu_devices(cores: int | None = None) -> int:
  """One device per usable core, as a power of two, at most CPU_DEVICES_MAX (so that the batch sizes
  the presets use divide the device count)."""
  cores = usable_cores() if cores is None else cores
  return 1 << (min(max(cores, 1), CPU_DEVICES_MAX).bit_length() - 1)


def split_cpu(requested: int = 0) -> int | None:
  """Before JAX starts its backends: make this host's CPU `requested` JAX devices (0: `auto_cpu_devices`).

  One CPU device runs every op on XLA's intra-op thread pool, which runs the many mid-size
  operations of a field fit poorly (the two threads of a 2-core machine reach about the speed of
  one); with one device per core, each core fits its share of every chunk. Only work sharded over
  independent fields uses them (`devices(per_core=True)`: the fit); the rest (one transformer,
  its samples) keeps one device per process, which uses every core through XLA's threads, was not
  measurably slower (benchmarks/RESULTS.md, issue 19) and keeps those results independent of the
  number of cores. Only the CPU backend changes: on a GPU or TPU host the accelerators are the
  devices either way. An explicit --xla_force_host_platform_device_count in XLA_FLAGS wins (the
  tests set it): every stage then uses every device. Returns the count set, or None when XLA_FLAGS decides."""
  global _PER_CORE_CPU
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return None
  count = int(requested) or auto_cpu_devices()
  jax.config.update('jax_num_cpu_devices', count)
  _PER_CORE_CPU = count > 1
  return count


def start_backend() -> str:
  """Start JAX's backends; returns the default platform. A backend that cannot start (JAX_PLATFORMS naming
  one this machine or this install lacks, a plugin that fails) is one NfjaxError that says what to do,
  not JAX's traceback: with JAX_PLATFORMS=cuda and no visible GPU, JAX itself fails an assertion."""
  try:
    return jax.default_backend()
  except (RuntimeError, AssertionError) as e:
    asked = os.environ.get('JAX_PLATFORMS', '')
    reason = str(e).split(' (set JAX_PLATFORMS=')[0].split(' (you may need to')[0].rstrip('.') or (
        f"no {asked} device is visible, or JAX's plugin for it is not installed" if asked else 'no backend started')
    raise NfjaxError(
        f"JAX could not start its backend{f' (JAX_PLATFORMS={asked})' if asked else ''}: {reason}. On a GPU "
        "machine install JAX for it (pip install -e '.[cuda12]'), on a TPU VM pip install -e '.[tpu]'; to "
        "compute on this machine's CPU, unset JAX_PLATFORMS or set JAX_PLATFORMS=cpu.") from None


def devices(per_core: bool = False) -> list[jax.Device]:
  """The devices a stage computes on: all of them, except on a CPU that `split_cpu` made one device
  per core, where only `per_core` work (fields fitted independently) uses them all and the rest
  one device per process."""
  every = jax.local_devices() if _THIS_PROCESS else jax.devices()
  if per_core or not _PER_CORE_CPU or every[0].platform != 'cpu':
    return every
  first = {}
  for d in every:
    first.setdefault(d.process_index, d)
  return [first[p] for p in sorted(first)]


@contextlib.contextmanager
def this_process_only():
  """Meshes made in this block use this process's own devices (work process 0 does alone in a
  multi-process run, nfjax/processes.py `on_main`); `config.mesh` applies where it fits them, else
  the mesh is every local device on the data axis."""
  global _THIS_PROCESS
  before, _THIS_PROCESS = _THIS_PROCESS, True
  try:
    yield
  finally:
    _THIS_PROCESS = before


def mesh_shape(mesh_cfg, num_devices: int | None = None) -> tuple[int, ...]:
  n = len(devices()) if num_devices is None else num_devices
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise ConfigError(f"at most one mesh axis may be -1, got mesh={dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh axis sizes must be positive or -1, got mesh={dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if fills:
    if n % fixed:
      raise ConfigError(f"{n} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[fills[0]] = n // fixed
  if math.prod(sizes) > n:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                      f"only {n} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg, pool: Sequence[jax.Device] | None = None, per_core: bool = False) -> Mesh:
  """A mesh over the first prod(shape) devices of `pool` (default `devices(per_core)`; all of them
  when an axis is -1)."""
  pool = list(pool if pool is not None else devices(per_core))
  try:
    shape = mesh_shape(mesh_cfg, len(pool))
  except ConfigError:
    if not _THIS_PROCESS:
      raise
    shape = (len(pool), 1, 1)   # the multi-process run's mesh does not fit one process: data-parallel
  used = pool[:math.prod(shape)]
  if len(used) < len(pool) and (shape, len(pool)) not in _WARNED:
    _WARNED.add((shape, len(pool)))
    log('main', f"WARNING: mesh {dict(zip(MESH_AXES, shape))} uses {len(used)} of the {len(pool)} devices; "
                f"{len(pool) - len(used)} stay idle (set one mesh axis to -1 to use them all)")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=used)


def put(x, shardings):
  """Host arrays (a pytree; the same values on every process) -> jax.Arrays with `shardings` (one, or
  a matching pytree), which may span several processes' devices: each process places its shards."""
  def one(a, s):
    if s.is_fully_addressable:
      return jax.device_put(a, s)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda a: one(a, shardings), x)
  return jax.tree.map(one, x, shardings)


def logical_spec(*logical_axes: str | None) -> P:
  return P(*(LOGICAL_RULES.get(a) if a is not None else None for a in logical_axes))


def named(mesh: Mesh, *logical_axes: str | None) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(*logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def axis_size(mesh: Mesh, logical_axis: str) -> int:
  """How many shards a logical axis is split into on this mesh."""
  rule = LOGICAL_RULES.get(logical_axis)
  if rule is None:
    return 1
  axes = (rule,) if isinstance(rule, str) else rule
  return int(np.prod([mesh.shape[a] for a in axes]))


def leading_axis_sharding(mesh: Mesh, tree, logical_axis: str = 'fields'):
  """A pytree of shardings that splits every leaf's leading axis on `logical_axis`."""
  return jax.tree.map(lambda x: NamedSharding(mesh, logical_spec(logical_axis, *([None] * (np.ndim(x) - 1)))), tree)


def _mesh_axes(rule) -> tuple[str, ...]:
  if rule is None:
    return ()
  return (rule,) if isinstance(rule, str) else tuple(rule)


def fitted_spec(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]) -> P:
  """The PartitionSpec of an array with these logical axes and this shape on `mesh`.

  Unlike `logical_spec`, it never produces an invalid spec: a mesh axis is dropped from a
  dimension it does not divide (e.g. a 257-token vocabulary on model=2 stays replicated) and a
  mesh axis is used at most once per array. Parameters and optimiser state use this, so any model
  size runs on any mesh; the price of a dropped axis is replication, never an error.
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for name, dim in zip(logical_axes, shape):
    keep = []
    size = 1
    for ax in _mesh_axes(LOGICAL_RULES.get(name) if name is not None else None):
      n = mesh.shape[ax]
      if ax in used or n == 1 or dim % (size * n):
        continue
      keep.append(ax)
      size *= n
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def fitted(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, fitted_spec(mesh, logical_axes, shape))


def cpu_collectives_on_loopback() -> bool:
  """Keep a multi-process CPU run's collectives (gloo over TCP) on 127.0.0.1. gloo binds the
  address the host name resolves to, which on many machines is not loopback (and may be
  firewalled); launch/local.sh and the tests run every process on this machine. Call before the
  CPU backend exists (it is created after jax.distributed.initialize). Uses JAX internals: where
  they are missing, nothing changes (False)."""
  try:
    if socket.gethostbyname(socket.gethostname()).startswith('127.'):
      return True
  except OSError:
    pass
  if _jaxlib is None or not hasattr(_jaxlib, 'make_gloo_tcp_collectives'):
    return False

  def cpu_backend():
    collectives = _jaxlib.make_gloo_tcp_collectives(distributed_client=_jax_distributed.global_state.client,
                                                    hostname='127.0.0.1')
    return _xla_bridge.make_cpu_client(collectives=collectives)
  _xla_bridge.register_backend_factory('cpu', cpu_backend, priority=0, fail_quietly=False)
  return True

"""Explanation and evaluation of a data set spread over all local devices (data parallel).

Each device explains its own slice of the batch with the same jitted program
(``shard_map`` over a 1-D ``data`` mesh); parameters are replicated. The images of a
batch never interact, so the result equals the single-device one.

Multi-host: call ``jax.distributed.initialize()`` first on every host; ``jax.devices()``
then lists every host's devices and ``data_mesh()`` spans them. Each host passes its own
images to ``jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)``
and calls ``explain_sharded`` with the resulting global array; each host reads back its
addressable shards (``out.addressable_shards``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mamba_jax.config import VimConfig
from mamba_jax.options import Options
from mamba_jax.preprocess import pad_batch
from xai.hidden_attention import DEFAULT_BUDGET
from xai.methods import check_arguments, explain, resolve_start_layer

try:  # jax >= 0.7 exposes shard_map at the top level
    from jax import shard_map as _shard_map
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map


def _smap(fn, mesh, in_specs, out_specs):
    """shard_map without the replication/varying-axes check: the per-device programs hold
    scans whose zero initial carries it cannot type (each device's work is independent)."""
    try:
        return _shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    except TypeError:  # pragma: no cover - jax before the check_vma name
        return _shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: all devices)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def _pad_to(x, n: int):
    """Pad axis 0 to a multiple of ``n`` (the device count)."""
    return pad_batch(x, -(-x.shape[0] // n) * n)


@functools.lru_cache(maxsize=32)
def _sharded_fn(config, method, start_layer, mode, mesh, with_target, budget, options):
    def per_device(params, images, target):
        return explain(config, params, images, method, target=target if with_target else None,
                       start_layer=start_layer, mode=mode, budget=budget, options=options)

    fn = _smap(per_device, mesh, (P(), P("data"), P("data")), P("data"))
    return jax.jit(fn)


def explain_sharded(config: VimConfig, params, images, method: str, *, target=None, start_layer: int | None = None,
                    mode: str = "exact", mesh: Mesh | None = None, budget: int = DEFAULT_BUDGET,
                    options: Options | None = None):
    """``xai.explain`` with the batch split over the devices of ``mesh`` (default: all local ones).

    The batch is padded to a multiple of the device count (the padding is dropped from the
    result). Returns maps [B, grid_h, grid_w], equal to ``explain`` on one device.
    ``budget`` and ``options`` (``mamba_jax.options.Options``) as for ``explain``.
    ``start_layer`` None (the default) is ``default_start_layer(config)``; every argument is
    checked as ``explain`` checks it, before any work.
    """
    from mamba_jax.vim import check_images

    mesh = mesh if mesh is not None else data_mesh()
    n = mesh.size
    images = check_images(config, images)
    B = images.shape[0]
    start_layer = resolve_start_layer(config, start_layer)
    target = check_arguments(config, method, mode, start_layer, target, B)
    x = _pad_to(jnp.asarray(images), n)
    t = jnp.zeros((B,), jnp.int32) if target is None else jnp.broadcast_to(jnp.asarray(target, jnp.int32), (B,))
    t = _pad_to(t, n)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    t = jax.device_put(t, NamedSharding(mesh, P("data")))
    fn = _sharded_fn(config, method, start_layer, mode, mesh, target is not None, budget, options)
    return fn(params, x, t)[:B]


@functools.lru_cache(maxsize=32)
def _sharded_predict(config, mesh, options=None):
    from mamba_jax.vim import vim_apply

    return jax.jit(_smap(lambda p, x: vim_apply(config, p, x, options=options), mesh, (P(), P("data")), P("data")))


def predict_sharded(config: VimConfig, params, images, mesh: Mesh | None = None, options: Options | None = None):
    """Logits of a batch split over the devices of ``mesh`` (for the perturbation tests)."""
    mesh = mesh if mesh is not None else data_mesh()
    B = images.shape[0]
    x = jax.device_put(_pad_to(jnp.asarray(images), mesh.size), NamedSharding(mesh, P("data")))
    return _sharded_predict(config, mesh, options)(params, x)[:B]

"""The fit stage: the modality's data -> WORKDIR/fields (the weight dataset, nfjax/io/fields.py).

The modality (`data.modality`) loads the per-field targets and makes the fitter (its features,
loss and per-field quality); nfjax/fields/stack.py fits them in resumable chunks of
`fit.chunk_size` (one compiled jit(vmap(fit)) per chunk, the field axis sharded over every
device) after the shared init, refits the hard ones and merges the chunks. A killed run re-run
with the same command skips the finished chunks and ends with the same dataset.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from nfjax import config as config_lib
from nfjax import modalities, processes, sharding
from nfjax.configs import checks
from nfjax.fields import fitting, mlp, stack
from nfjax.io import fields as field_io
from nfjax.io import workdir as wd
from nfjax.utils.logging import log

STAGE = 'fit'
# The fit.* keys every modality's fields depend on (the modality adds its own: Modality.fit_keys).
FIT_KEYS = ('seed', 'data', 'field', 'fit.steps', 'fit.lr', 'fit.schedule', 'fit.warmup_steps', 'fit.end_lr_factor',
            'fit.b1', 'fit.b2', 'fit.loss', 'fit.l2', 'fit.anchor', 'fit.init', 'fit.prototypes', 'fit.prototype_target', 'fit.shared_init_index', 'fit.shared_init_steps',
            'fit.shared_init_candidates', 'fit.shared_init_probe', 'fit.refit_below', 'fit.refit_steps_factor',
            'fit.chunk_size', 'fit.formulation', 'fit.block_fields', 'fit.matmul_precision')


def run(config, workdir: str) -> dict:
  t_start = time.perf_counter()
  checks.validate(config, (STAGE,))
  spec = mlp.FieldSpec.from_config(config.field)
  modality = modalities.for_config(config)
  quality = modality.quality
  stage = wd.StageDir(workdir, wd.FIELDS, config, FIT_KEYS + modality.fit_keys, stage=STAGE)
  done = stage.finished()
  if done is not None:
    log(STAGE, f"already finished in {stage.path} ({done['num_fields']} fields, {quality.label} mean "
               f"{quality.fmt(done[f'{quality.name}_mean'])}); skipping")
    return done

  data = modality.load(config, workdir)
  n = len(data)
  mesh = sharding.make_mesh(config.mesh, per_core=True)
  fitter = modality.make_fitter(spec, config, mesh, data)
  chunk = int(config.fit.chunk_size)
  log(STAGE, f"{data.description}; field {spec.num_params} params; {-(-n // chunk)} chunk(s) of {min(chunk, n)} over "
             f"{mesh.size} {mesh.devices.flat[0].device_kind} device(s); {config.fit.steps} steps per field; "
             f"init={config.fit.init}; {fitter.formulation} fit")
  space = modality.prototype_targets(data) if fitting.prototypes_of(config.fit) > 0 else None
  refit, fitted_now, fit_seconds = stack.fit_dataset(stage, config, fitter, data.rows, np.asarray(data.labels),
                                                     np.asarray(data.source_index), quality, space)
  # The dataset, its pictures and summary: process 0 alone in a multi-process run (nfjax/processes.py).
  return processes.on_main(STAGE, lambda: _write(stage, config, spec, modality, data, refit, fitted_now, fit_seconds,
                                                 fitter.compile_seconds, t_start, mesh))


def _write(stage, config, spec, modality, data, refit, fitted_now, fit_seconds, compile_seconds, t_start,
           fit_mesh) -> dict:
  """The finished chunks -> the dataset (fields/), its pictures (on this process's devices) and summary."""
  quality = modality.quality
  chunk = int(config.fit.chunk_size)
  arrays = stack.merge_chunks(stage, config, -(-len(data) // chunk), refit, quality)
  meta = {
      'modality': modality.name, 'field': spec.to_dict(), 'layout': spec.layout,
      'params_per_field': spec.num_params, 'num_fields': len(arrays['weights']), 'num_classes': int(data.num_classes),
      'source': data.source, 'init': config.fit.init, 'quality_metric': quality.metric,
      'shared_init_index': int(config.fit.shared_init_index), 'fingerprint': stage.fingerprint, 'chunk_size': chunk,
      **data.meta, **modality.fit_meta(config, spec, data),
  }
  if fitting.prototypes_of(config.fit) > 0:   # fields/prototypes.npz: where each field started
    meta['prototypes_per_class'] = fitting.prototypes_of(config.fit)
  field_io.write(stage.path, arrays, meta)
  modality.fit_pictures(stage, config, spec, data, arrays, sharding.make_mesh(config.mesh, per_core=True))
  return _finish(stage, config, spec, quality, arrays, refit, fitted_now, fit_seconds, compile_seconds,
                 time.perf_counter() - t_start, fit_mesh, data.source, modality.fit_summary(config))


def _finish(stage, config, spec: mlp.FieldSpec, quality, arrays, refit, fitted_now, fit_seconds, compile_seconds,
            seconds, mesh, source: str, extra: dict) -> dict:
  """summary.json (written last: it marks the dataset complete); removes the chunks."""
  n = len(arrays['weights'])
  q, flags = arrays['quality'], arrays['flags']
  finite = q[np.isfinite(q)]
  flagged = np.nonzero(flags)[0]
  floor = float(config_lib.get(config, quality.floor_key))
  if len(flagged):
    log(STAGE, f"WARNING: {len(flagged)} field(s) flagged (non-finite or {quality.label} < {quality.fmt(floor)}), "
               f"kept in the dataset but excluded from later stages: ids {flagged[:20].tolist()}"
               + (' ...' if len(flagged) > 20 else ''))
  stats = {
      'mean': float(finite.mean()) if len(finite) else float('nan'),
      'p10': float(np.percentile(finite, 10)) if len(finite) else float('nan'),
      'min': float(finite.min()) if len(finite) else float('nan'),
  }
  summary = {
      'num_fields': n, 'params_per_field': spec.num_params,
      **{f'{quality.name}_{k}': v for k, v in stats.items()},
      'quality_metric': quality.metric, **{f'quality_{k}': v for k, v in stats.items()},
      'num_flagged': int(len(flagged)), 'num_nonfinite': int(((flags & field_io.FLAG_NONFINITE) > 0).sum()),
      'fields_fitted_this_run': int(fitted_now),
      'fields_per_sec': float(fitted_now / fit_seconds) if fit_seconds > 0 and fitted_now else float('nan'),
      'seconds': float(seconds), 'compile_seconds': float(compile_seconds),
      'device_kind': mesh.devices.flat[0].device_kind, 'num_devices': int(mesh.size),
      'steps_per_field': int(config.fit.steps), 'init': config.fit.init, 'source': source,
      'num_refitted': int(len(refit['ids'])) if refit is not None else 0,
      **extra,
  }
  stage.write_summary(summary)
  field_io.remove_chunks(stage.path)
  d = quality.digits
  log(STAGE, f"done: {n} fields, {quality.label} mean {stats['mean']:.{d}f} / p10 {stats['p10']:.{d}f} / "
             f"min {quality.fmt(stats['min'])}, {summary['fields_per_sec']:.1f} fields/s "
             f"(compile {compile_seconds:.1f}s, total {seconds:.1f}s) -> {stage.path}")
  return summary

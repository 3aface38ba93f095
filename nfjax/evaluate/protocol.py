"""The evaluation protocol: one frame for every modality, with the modality's metrics plugged in.

For every sampling setting in samples/, and for three context rows measured the same way against
the same references, the frame

  1. takes the good (unflagged) fields and the first `evaluate.num_samples` samples of each setting;
  2. splits the good fields with one seeded permutation into N_ref references and held-out fields
     (N_ref = evaluate.num_reference, or the modality's default for the sample count, at most half
     of the good fields);
  3. measures the ceiling row ('reference': the held-out fields themselves -- what a perfect
     generator of this field dataset would score), the baseline row ('baseline': training fields +
     Gaussian noise of evaluate.baseline_noise x each parameter's std, a trivial memorizer), the
     no-structure row ('no_structure': weight tokens drawn independently per position from each
     class's per-slot histogram of the training tokens, with the headline setting's labels,
     decoded as samples are: nfjax/evaluate/no_structure.py; only where the workdir has finished
     tokens/ and tokenizer/; per prototype where the model conditions on prototypes, and then a second
     row 'no_structure_class' from the per-class histograms), then every setting (its first N_gen
     samples);
  4. writes eval/per_sample/<setting>.npz, the pictures (eval/grid_<setting>.png: each setting's samples
     by class, titled with the setting and its numbers, each row with its class's figure;
     eval/settings.png: every setting and the context rows on the comparison figures,
     nfjax/evaluate/settings_plot.py), and summary.json with the headline setting's numbers
     (evaluate.headline_top_k / headline_temperature) at the top; logs by how much the headline
     setting beats the no-structure row and which settings beat it on every comparison figure at
     once (`vs_no_structure`: the differences, `better_on_every_figure`,
     `settings_better_on_every_figure`; `vs_no_structure_class` the same against the class row).

The modality's `Evaluator` (`Modality.evaluator`) renders weights into candidates (images, meshes),
measures a candidate set against the references (its metrics, novelty against the training set),
draws its pictures and names its headline figures. Seeds: the split uses seed + 0xE7A1, the
baseline seed + 0xBA5E, the no-structure row seed + 0x5107, for every modality.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from nfjax.errors import DataError
from nfjax.evaluate import no_structure
from nfjax.evaluate import settings_plot
from nfjax.io import fields as field_io
from nfjax.io import files
from nfjax.io import samples as sample_io
from nfjax.io import workdir as wd
from nfjax.utils.logging import log

STAGE = 'evaluate'
SPLIT_STREAM = 0xE7A1
BASELINE_STREAM = 0xBA5E
MIN_GOOD_FIELDS = 4


class Evaluator:
  """What a modality plugs into the protocol (see nfjax/modalities/images/evaluate.py for one)."""

  # per_sample key of each sample's distance to its nearest training example (the novelty histogram)
  data_distance: str = ''
  # (result key, label, format, which is better: 'higher', 'lower' or the ideal value, e.g. 0.5 for a
  # 1-NNA against training references that copies push under it) of the figures the log compares with
  # the no-structure row, and that eval/settings.png plots; () = the numeric figures of `headline` (then
  # no direction: no picture, no "better on every figure")
  comparison: tuple[tuple[str, str, str, str | float], ...] = ()
  # the comparison figure on the x axis of eval/settings.png (the coverage of the reference set)
  coverage: str = ''

  def load(self, fields, good: np.ndarray) -> dict:
    """Read what the metrics compare with (real data of the good fields); returns {timing: seconds}."""
    return {}

  def default_references(self, num_samples: int) -> int:
    """N_ref when evaluate.num_reference is -1."""
    return num_samples

  def generated_count(self, num_references: int, num_samples: int) -> int:
    """N_gen: how many samples of each setting (and baseline rows) are measured."""
    return num_samples

  def references(self, ref_pos: np.ndarray) -> None:
    """Fix the reference set (positions in the good-field arrays)."""

  def describe(self) -> str:
    return ''

  def candidates(self, weights: np.ndarray):
    """Weights [n, P] -> what the metrics read (renders, meshes)."""
    raise NotImplementedError

  def setting_candidates(self, workdir: str, name: str, weights: np.ndarray):
    """(candidates, note or None) of one sampled setting (e.g. meshes the sample stage stored)."""
    return self.candidates(weights), None

  def ceiling(self, held_pos: np.ndarray, pool: np.ndarray) -> tuple[dict, dict, object]:
    """The reference row: (result, per_sample, candidates) of the held-out fields."""
    raise NotImplementedError

  def measure(self, name: str, candidates, labels: np.ndarray, weights: np.ndarray, pool: np.ndarray
              ) -> tuple[dict, dict]:
    """All metrics of one candidate set: (result for the summary, per-sample arrays). `pool`:
    positions of the training fields it may be matched with (novelty)."""
    raise NotImplementedError

  def baseline_extra(self, field_ids: np.ndarray, candidates) -> dict:
    return {}

  def per_sample_file(self, per_sample: dict, good: np.ndarray) -> dict:
    return per_sample

  def pictures(self, stage, shown: dict, nn_data: dict, nn_weight: dict, k: int) -> None:
    """eval/novelty.png and eval/neighbours_<set>.png; shown: {set: (candidates, labels, per_sample)}."""

  def setting_picture(self, stage, setting: dict, shown, result: dict) -> None:
    """eval/grid_<setting>.png: the setting's samples, one row per class, titled with the setting and its
    numbers, each row labelled with that class's figure; shown = (candidates, labels, per_sample)."""

  def headline(self, result: dict) -> dict:
    """The summary's headline figures from the headline setting's result."""
    raise NotImplementedError

  def summary(self) -> dict:
    """Further summary entries (protocol details, published numbers, ...)."""
    return {}

  def notes(self, results: dict, reference: dict, baseline: dict, n_ref: int, n_gen: int) -> list[str]:
    return []

  def done(self, head: str, result: dict, reference: dict, baseline: dict) -> str:
    return ''


def good_fields(fields: field_io.FieldDataset) -> np.ndarray:
  good = fields.good()
  if len(good) < MIN_GOOD_FIELDS:
    raise DataError(f"fields/ has only {len(good)} good fields; the evaluate stage needs at least {MIN_GOOD_FIELDS}")
  return good


def load_samples(workdir: str, settings: list[dict], params_per_field: int, cap: int) -> dict:
  """{setting name: (weights [S, P], labels [S])}, the first `cap` samples of each (cap -1: all)."""
  loaded = {}
  for s in settings:
    w, lab = sample_io.load_setting(workdir, s['name'], params_per_field)
    if cap > 0:
      w, lab = w[:cap], lab[:cap]
    if len(w) == 0:
      raise DataError(f"samples/{s['name']} holds no samples")
    loaded[s['name']] = (w, lab)
  return loaded


def headline_setting(settings: list[dict], e) -> str:
  """The setting whose numbers head the summary: evaluate.headline_top_k / headline_temperature /
  headline_guidance (1 = no classifier-free guidance); without one of that guidance scale, the one
  without guidance first, then a guided one."""
  want = float(getattr(e, 'headline_guidance', 1.0))
  order = lambda s: (abs(float(s.get('guidance', 1.0)) - want) > 1e-6, 'guidance' in s)
  for s in sorted(settings, key=order):
    try:
      if int(s.get('top_k') or -1) == int(e.headline_top_k) and \
          abs(float(s.get('temperature')) - float(e.headline_temperature)) < 1e-6:
        return s['name']
    except (TypeError, ValueError):
      continue
  return settings[0]['name']


def describe_setting(s: dict) -> str:
  """'top-k 3, T 0.8' (', top-p 0.9' when it filters) of a setting, else its name."""
  parts = []
  if s.get('top_k') is not None:
    parts.append(f"top-k {int(s['top_k'])}")
  if s.get('temperature') is not None:
    parts.append(f"T {float(s['temperature']):g}")
  if s.get('top_p') is not None and float(s['top_p']) < 1.0:
    parts.append(f"top-p {float(s['top_p']):g}")
  return ', '.join(parts) or str(s['name'])


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def compare(ev: Evaluator, h: dict, other: dict) -> tuple[str, dict]:
  """The headline setting's result `h` against another row: ('class consistency 0.612 vs 0.588
  (+0.024), ...', {key: h[key] - other[key]}) over the evaluator's `comparison` figures."""
  figures = ev.comparison or tuple((k, k, '.4g') for k, v in ev.headline(h).items() if _finite(v))
  parts, diffs = [], {}
  for key, label, fmt, *_ in figures:
    a, b = h.get(key), other.get(key)
    if _finite(a) and _finite(b):
      diffs[key] = float(a - b)
      parts.append(f"{label} {a:{fmt}} vs {b:{fmt}} ({a - b:+{fmt}})")
    else:
      parts.append(f"{label} {format(a, fmt) if _finite(a) else '-'} vs {format(b, fmt) if _finite(b) else '-'}")
  return ', '.join(parts), diffs


def better_on_every_figure(ev: Evaluator, row: dict, other: dict) -> bool | None:
  """Whether `row` beats `other` on every one of the evaluator's comparison figures at once (strictly,
  each in its better direction); None when the figures have no direction or one is missing."""
  if not ev.comparison or any(len(f) < 4 for f in ev.comparison):
    return None
  for key, _, _, better in ev.comparison:
    a, b = row.get(key), other.get(key)
    if not (_finite(a) and _finite(b)):
      return None
    if not settings_plot.better(a, b, better):
      return False
  return True


def coverage_of_reference(ev: Evaluator, row: dict, h: dict, reference: dict) -> dict | None:
  """The coverage figure (`ev.coverage`) of a row and of the headline `h` as shares of the reference
  row's, the held-out fields' (what real fields cover of the references): {'row', 'headline'}; None where
  a figure is missing or the reference covers nothing."""
  key = ev.coverage
  c_row, c_head, c_ref = row.get(key), h.get(key), (reference or {}).get(key)
  if not (key and _finite(c_row) and _finite(c_head) and _finite(c_ref) and c_ref > 0):
    return None
  return {'row': float(c_row / c_ref), 'headline': float(c_head / c_ref)}


def _versus(ev: Evaluator, name: str, row: dict, head: str, settings: list[dict], results: dict,
            reference: dict) -> dict:
  """Log and return the headline setting against a no-structure row: the differences, whether it is better
  on every figure at once, which settings are, and how much of the held-out fields' coverage the row and
  the headline reach (a row at or above it cannot be passed on coverage by samples spread over the
  references as real fields are)."""
  h = results[head]
  line, versus = compare(ev, h, row)
  log(STAGE, f"vs {name} at {describe_setting(next(s for s in settings if s['name'] == head))}: {line}")
  share = coverage_of_reference(ev, row, h, reference)
  if share is not None:
    label = next((lab for k, lab, *_ in ev.comparison if k == ev.coverage), ev.coverage)
    log(STAGE, f"{name} reaches {share['row']:.2f} of the held-out fields' {label} ({row[ev.coverage]:.3f} "
               f"against {reference[ev.coverage]:.3f}), the headline {share['headline']:.2f} ({h[ev.coverage]:.3f})")
    versus['coverage_of_reference'] = share
  versus['better_on_every_figure'] = better_on_every_figure(ev, h, row)
  if versus['better_on_every_figure'] is not None:
    better = [n for n, r in results.items() if better_on_every_figure(ev, r, row)]
    labels = [label for _, label, *_ in ev.comparison]
    figures = ' and '.join([', '.join(labels[:-1]), labels[-1]] if len(labels) > 1 else labels)
    log(STAGE, f"settings better than {name} on {figures} at once: {', '.join(better) or 'none'} "
               f"(of {len(results)}; eval/settings.png)")
    versus['settings_better_on_every_figure'] = better
  return {'setting': head, **versus}


def perturbed_fields(fields: field_io.FieldDataset, n: int, noise: float, seed: int,
                     pool: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """n training fields (drawn without replacement when possible) + N(0, (noise * std_j)^2) per
  parameter j, std_j the spread of parameter j over the good fields.

  Returns (weights [n, P] float32, labels [n], source field ids [n]).
  """
  pool = fields.good() if pool is None else np.asarray(pool)
  if len(pool) == 0:
    raise DataError("no good fields to draw the baseline from")
  rng = np.random.default_rng(seed)
  ids = rng.choice(pool, size=n, replace=n > len(pool))
  w = np.asarray(fields.weights[np.sort(pool)], np.float64)
  std = w.std(0)
  eps = rng.standard_normal((n, w.shape[1]))
  out = (np.asarray(fields.weights[ids], np.float64) + noise * std * eps).astype(np.float32)
  return out, np.asarray(fields.labels[ids], np.int32), ids.astype(np.int64)


def write_fake_samples(workdir: str, settings: list[dict] | None = None, num_samples: int = 64,
                       seed: int = 0, nonfinite: int = 0) -> str:
  """A samples/ directory from perturbed training fields: the evaluate stage runs, is tested and
  is calibrated without a trained model.

  settings: [{'name', 'top_k', 'temperature', 'top_p', 'noise'}]; the 'noise' of each setting is
  the baseline noise scale used for it (default 0.1). `nonfinite` rows of every setting are set to
  NaN / inf, as a failed decode would leave them.
  """
  fields = field_io.load(files.join(workdir, wd.FIELDS))
  if settings is None:
    settings = [{'name': 'topk3_t0.8', 'top_k': 3, 'temperature': 0.8, 'top_p': 1.0, 'noise': 0.05},
                {'name': 'topk5_t1.0', 'top_k': 5, 'temperature': 1.0, 'top_p': 1.0, 'noise': 0.2}]
  for i, s in enumerate(settings):
    w, labels, _ = perturbed_fields(fields, num_samples, float(s.get('noise', 0.1)), seed + 101 * (i + 1))
    for k in range(min(nonfinite, num_samples)):
      w[k, k % w.shape[1]] = np.nan if k % 2 == 0 else np.inf
    sample_io.write_setting(workdir, s['name'], np.zeros((num_samples, 1), np.int32), w, labels)
  sample_io.write_settings(workdir, [{k: s[k] for k in ('name', 'top_k', 'temperature', 'top_p') if k in s}
                                     for s in settings])
  wd.write_summary(sample_io.directory(workdir),
                   {'num_samples': num_samples, 'fake': True, 'settings': [s['name'] for s in settings]})
  return sample_io.directory(workdir)


def evaluate(config, workdir: str, stage, fields, settings: list[dict], ev: Evaluator, mesh) -> dict:
  """The protocol on a claimed eval/ directory (`stage`); returns the summary it wrote."""
  t_start = time.perf_counter()
  e = config.evaluate
  seed = int(config.seed)
  good = good_fields(fields)
  loaded = load_samples(workdir, settings, fields.params_per_field, int(e.num_samples))
  timings = dict(ev.load(fields, good))
  labels = np.asarray(fields.labels[good], np.int32)

  n_eval = max(len(w) for w, _ in loaded.values())
  n_ref = int(e.num_reference) if int(e.num_reference) > 0 else ev.default_references(n_eval)
  n_ref = max(1, min(n_ref, len(good) // 2))
  n_gen = ev.generated_count(n_ref, n_eval)
  n_held = min(n_gen, len(good) - n_ref)
  perm = np.random.default_rng(seed + SPLIT_STREAM).permutation(len(good))
  ref_pos, held_pos = np.sort(perm[:n_ref]), np.sort(perm[n_ref:n_ref + n_held])
  not_held = np.setdiff1d(np.arange(len(good)), held_pos)
  all_pool = np.arange(len(good))
  t0 = time.perf_counter()
  ev.references(ref_pos)
  timings['reference_matrix'] = time.perf_counter() - t0
  log(STAGE, f"{len(good)} good fields: {n_ref} references, {n_held} held out; {len(settings)} setting(s), the "
             f"first {n_gen} samples of each" + (f"; {ev.describe()}" if ev.describe() else ''))
  if min(n_ref, n_held, n_gen) < 2:
    log(STAGE, f"WARNING: {n_gen} sample(s) per setting against {n_ref} reference(s) and {n_held} held-out field(s): "
               "a Fréchet distance needs 2 of each (it is nan here) and the set figures mean little with so few; "
               "raise sample.num_samples (and data.num_fields) for figures worth reading")

  shown, nn_data, nn_weight, per_sample_files = {}, {}, {}, {}

  # --- ceiling: the held-out fields ----------------------------------------------------------------
  t0 = time.perf_counter()
  reference, ps, cands = ev.ceiling(held_pos, not_held)
  nn_data['held-out fields'], nn_weight['held-out fields'] = ps[ev.data_distance], ps['nn_weight_l2']
  shown['reference'] = (cands, labels[held_pos], ps)
  timings['reference'] = time.perf_counter() - t0

  # --- trivial baseline: noisy copies of training fields ----------------------------------------
  t0 = time.perf_counter()
  noise = float(e.baseline_noise)
  bw, blab, bids = perturbed_fields(fields, n_gen, noise, seed + BASELINE_STREAM)
  cands = ev.candidates(bw)
  baseline, ps = ev.measure(f'baseline (fields + {noise:g} std noise)', cands, blab, bw, all_pool)
  baseline.update({'what': f"training fields + Gaussian noise of {noise:g} x each parameter's std (a memorizer)",
                   'noise': noise, **ev.baseline_extra(bids, cands)})
  nn_data['baseline'], nn_weight['baseline'] = ps[ev.data_distance], ps['nn_weight_l2']
  shown['baseline'] = (cands, blab, ps)
  timings['baseline'] = time.perf_counter() - t0

  # --- no structure: tokens from each class's per-slot training-token histogram ------------------
  head = headline_setting(settings, e)
  nostructs = {}    # no_structure, and no_structure_class where the model conditions on prototypes
  if no_structure.available(workdir):
    nlab = loaded[head][1][:n_gen]       # the headline setting's classes, as many of each
    t0 = time.perf_counter()
    drawn = no_structure.draw_rows(workdir, nlab, seed + no_structure.STREAM, fields.params_per_field, STAGE)
    for name, (nw, info) in drawn.items():
      cands = ev.candidates(nw)
      kind = 'per-class' if name == no_structure.NAME_CLASS else 'per-slot'
      row, ps = ev.measure(f"{name} ({kind} token histograms)", cands, nlab, nw, all_pool)
      nostructs[name] = {**row, **info, 'labels_from': head}
      nn_data[name], nn_weight[name] = ps[ev.data_distance], ps['nn_weight_l2']
      shown[name] = (cands, nlab, ps)
      timings[name] = time.perf_counter() - t0
      t0 = time.perf_counter()
  nostruct = nostructs.get(no_structure.NAME)

  # --- the sampled settings -------------------------------------------------------------------------
  results = {}
  for s in settings:
    t0 = time.perf_counter()
    name = s['name']
    w, lab = loaded[name]
    w, lab = w[:n_gen], lab[:n_gen]
    cands, how = ev.setting_candidates(workdir, name, w)
    res, ps = ev.measure(name, cands, lab, w, all_pool)
    res.update({k: s.get(k) for k in ('top_k', 'temperature', 'top_p')})
    if 'guidance' in s:
      res['guidance'] = s['guidance']
    if how:
      res['meshes'] = how
    results[name] = res
    nn_data[name], nn_weight[name] = ps[ev.data_distance], ps['nn_weight_l2']
    path = stage.file('per_sample', f'{name}.npz')
    files.write_npz(path, **ev.per_sample_file(ps, good), labels=lab)
    per_sample_files[name] = f'per_sample/{name}.npz'
    shown[name] = (cands, lab, ps)
    timings[f'setting:{name}'] = time.perf_counter() - t0

  t0 = time.perf_counter()
  ev.pictures(stage, shown, nn_data, nn_weight, int(e.num_neighbours))
  for s in settings:
    ev.setting_picture(stage, s, shown[s['name']], results[s['name']])
  context = {'reference': reference, 'baseline': baseline, **nostructs}
  settings_plot.settings_png(stage.file('settings.png'), ev.comparison, ev.coverage, results, context, head,
                             f"every setting ({n_gen} samples each) and the context rows, measured alike")
  timings['pictures'] = time.perf_counter() - t0

  # --- summary ----------------------------------------------------------------------------------------
  h = results[head]
  notes = []
  if n_held < n_gen:
    notes.append(f"only {n_held} held-out fields for the reference row (vs {n_gen} samples)")
  notes += ev.notes(results, reference, baseline, n_ref, n_gen)
  if any(len(w) < n_gen for w, _ in loaded.values()):
    notes.append(f"some settings have fewer than {n_gen} samples")
  versus = {}   # {row name: the headline against it}
  if nostruct is None:
    notes.append(f"no finished {wd.TOKENS}/ and {wd.TOKENIZER}/ in the workdir (samples not made by the pipeline): "
                 f"no {no_structure.NAME} row")
  else:
    if nostruct.get('classes_without_training_sequences'):
      notes.append(f"{no_structure.NAME}: class(es) {nostruct['classes_without_training_sequences']} have no training "
                   f"sequences; their tokens come from the histograms of all classes")
    for name, row in nostructs.items():
      versus[name] = _versus(ev, name, row, head, settings, results, reference)
  summary = {
      'modality': fields.modality, 'headline_setting': head, **ev.headline(h),
      'num_samples': int(n_eval), 'num_generated': int(n_gen), 'num_reference': int(n_ref),
      'num_heldout_fields': int(n_held), 'num_fields': int(len(good)),
      **ev.summary(),
      'settings': results, 'reference': reference, 'baseline': baseline,
      **{k: v for name, row in nostructs.items() for k, v in ((name, row), (f'vs_{name}', versus[name]))},
      'per_sample_files': per_sample_files, 'notes': notes,
      'timings': {k: float(v) for k, v in timings.items()},
      'seconds': float(time.perf_counter() - t_start),
      'device_kind': mesh.devices.flat[0].device_kind, 'num_devices': int(mesh.size),
  }
  stage.write_summary(summary)
  summary = stage.summary  # as a re-run returns it (JSON types)
  log(STAGE, f"done: {head}: {ev.done(head, h, reference, baseline)}; {summary['seconds']:.1f}s -> {stage.path}")
  return summary

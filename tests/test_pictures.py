"""Pictures that explain themselves: setting titles, captions, shapes beside their ground truth, and
the launcher's closing lines that list every picture."""

import os

import numpy as np
from PIL import Image

from nfjax.utils import images as img_utils


def test_setting_title_names_every_field_of_the_setting():
  t = img_utils.setting_title({'name': 'topk3_t0.8', 'top_k': 3, 'temperature': 0.8, 'top_p': 1.0})
  assert t == 'sampling topk3_t0.8: top-k 3, temperature 0.8, top-p off (1)'
  t = img_utils.setting_title({'name': 'topk0_t1_p0.9', 'top_k': 0, 'temperature': 1.0, 'top_p': 0.9})
  assert 'top-k off (0)' in t and 'temperature 1' in t and 'top-p 0.9' in t
  t = img_utils.setting_title({'name': 'beam4', 'top_k': 0, 'temperature': 0.0, 'top_p': 1.0, 'beam_width': 4})
  assert 'beam search, width 4' in t and t.startswith('sampling beam4')
  assert 'guidance 2.5' in img_utils.setting_title({'name': 'x', 'top_k': 5, 'temperature': 1.0, 'top_p': 1.0,
                                                    'guidance': 2.5})
  t = img_utils.setting_title({'name': 'topk3_t0.8_g2', 'top_k': 3, 'temperature': 0.8, 'top_p': 1.0, 'guidance': 2.0})
  assert t == 'sampling topk3_t0.8_g2: top-k 3, temperature 0.8, top-p off (1), classifier-free guidance 2'
  assert 'temperature 0 (greedy)' in img_utils.setting_title({'top_k': 1, 'temperature': 0.0, 'top_p': 1.0})
  t = img_utils.setting_title({'name': 'topk0_t0.9', 'top_k': 0, 'temperature': 0.9, 'top_p': 1.0, 'support': 'training'})
  assert t.endswith('top-p off (1), each slot inside its training codes (support training)'), t


def test_captioned_adds_wrapped_lines_above_and_below():
  img = Image.new('L', (100, 50), 0)
  out = img_utils.captioned(img, 'a title', 'a caption long enough to wrap over a few lines of the narrow picture')
  lines = img_utils.wrap('a caption long enough to wrap over a few lines of the narrow picture', out.width - 8)
  assert len(lines) >= 2
  assert out.width == 240 and out.height == 50 + img_utils.LINE * (1 + len(lines)) + 8
  # The title sits above the picture: the picture's rows are pasted below it, unchanged.
  assert np.asarray(out)[img_utils.LINE + 4:img_utils.LINE + 4 + 50, :100].max() == 0
  from PIL import ImageFont
  font = ImageFont.load_default()
  assert all(font.getlength(ln) <= out.width - 8 for ln in lines)   # nothing clipped at the right edge
  assert img_utils.captioned(img) is img


def test_image_grid_names_its_setting(tmp_path):
  from nfjax.fields import mlp
  from nfjax.modalities.images import ImageOutput

  class Fields:
    meta = {'image_shape': [8, 8]}
  spec = mlp.FieldSpec(in_dims=2, freqs=(1.0,), hidden=(4,))
  weights = np.random.default_rng(0).normal(size=(6, spec.num_params)).astype(np.float32)
  labels = np.arange(6) % 3
  out = ImageOutput(Fields(), spec)
  titled = []
  original = img_utils.captioned
  try:
    img_utils.captioned = lambda img, title=(), caption=(), **k: titled.append((title, caption)) or original(
        img, title, caption, **k)
    (tmp_path / 'a').mkdir()
    out.write(str(tmp_path / 'a'), weights, labels, 3, setting={'name': 'topk3_t0.8', 'top_k': 3,
                                                                  'temperature': 0.8, 'top_p': 1.0})
  finally:
    img_utils.captioned = original
  assert titled[0][0] == 'sampling topk3_t0.8: top-k 3, temperature 0.8, top-p off (1)'
  assert 'conditioned on' in titled[0][1]
  bare = img_utils.grid([np.zeros((2, 8, 8))] * 3, row_labels=['class 0', 'class 1', 'class 2'])
  with Image.open(tmp_path / 'a' / 'grid.png') as png:
    assert png.height >= bare.height + 2 * img_utils.LINE   # room for the title and the caption


def test_row_accuracy_counts_each_class_and_non_finite_samples_as_wrong():
  from nfjax.modalities.images import evaluate as image_eval
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 0])
  pred = np.array([0, 1, 1, 3, -1, 2, 0, 1, 0])
  # class 0: 3 of 4 right; class 1: 2 of 3 (the non-finite one is wrong); class 2: 1 of 2; 3, 4: no samples
  assert image_eval.row_accuracy(labels, pred, 5) == [(0, 3, 4), (1, 2, 3), (2, 1, 2)]
  assert image_eval.row_accuracy(labels, labels, 3) == [(0, 4, 4), (1, 3, 3), (2, 2, 2)]


def test_eval_class_grid_labels_rows_and_frames_exactly_the_misclassified_tiles():
  from nfjax.modalities.images import evaluate as image_eval
  rng = np.random.default_rng(0)
  labels = np.arange(30) % 3
  images = rng.uniform(size=(30, 12, 12)).astype(np.float32)
  pred = labels.copy()
  wrong = {4: 2, 9: -1, 12: 1}            # sample -> predicted class (-1: non-finite)
  for k, p in wrong.items():
    pred[k] = p
  captured = {}
  original = img_utils.grid
  try:
    img_utils.grid = lambda rows, **kw: captured.update(kw) or original(rows, **kw)
    marked = image_eval.class_grid(images, labels, pred, 3, per_class=5)
  finally:
    img_utils.grid = original
  # rows: class, then its accuracy over all its samples (not just the shown ones)
  assert captured['row_labels'] == ['class 0\n0.80 (8/10)', 'class 1\n0.90 (9/10)', 'class 2\n1.00 (10/10)']
  clean = image_eval.class_grid(images, labels, labels, 3, per_class=5)
  bare = img_utils.grid([images[labels == c][:5] for c in range(3)], row_labels=['a'] * 3,
                        label_width=image_eval.GRID_LABEL_WIDTH)
  assert marked.mode == 'RGB' and marked.size == clean.size and marked.width == bare.width
  assert marked.height > bare.height + img_utils.LINE          # the caption under the grid
  diff = (np.asarray(marked) != np.asarray(clean)).any(-1)
  diff[:bare.height, :image_eval.GRID_LABEL_WIDTH] = False     # the row labels differ (their accuracies)
  # sample k is tile (class k % 3, k // 3) of the first 5 per class: 4 -> (1, 1), 9 -> (0, 3), 12 -> (0, 4)
  expect = np.zeros_like(diff)
  h = w = 12 * 3
  for i, j in ((1, 1), (0, 3), (0, 4)):
    x0, y0, x1, y1 = img_utils.tile_box(i, j, h, w, left=image_eval.GRID_LABEL_WIDTH)
    assert diff[y0:y1 + 1, x0:x1 + 1].any(), (i, j)
    assert (np.asarray(marked)[y0, x0:x1 + 1] == img_utils.MARK).all()     # a red frame
    expect[y0:y1 + 1, x0:x1 + 1] = True
  assert not (diff & ~expect).any()                            # nothing outside those tiles changed


def test_shapes_eval_grid_rows_carry_class_coverage_and_frame_other_class_neighbours(tmp_path, monkeypatch):
  from types import SimpleNamespace
  from nfjax.modalities.shapes import evaluate as shape_eval
  assert shape_eval.cov_row_label('airplane', 0.4, 5) == 'airplane\nCOV 0.40 (2/5)'
  assert shape_eval.cov_row_label('chair', None, 0) == 'chair\nCOV - (0 refs)'
  tet = (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32),
         np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]], np.int32))
  empty = (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
  names = ['sphere', 'box']
  ev = SimpleNamespace(num_classes=2, class_name=lambda c: names[c], ref_labels=np.array([0, 0, 1, 1, 1]),
                       train_labels=np.array([0, 1, 0, 1, 1, 0]), ref=np.zeros((5, 8, 3)))
  labels = np.array([0, 1, 0, 1, 0])
  meshes = [tet, tet, tet, empty, tet]
  result = {'class_cov': {'sphere': 0.5, 'box': 1 / 3}, 'cov': 0.4, 'class_cov_mean': 0.4167, 'mmd_cd_x100': 1.25,
            '1nna': 0.7, 'fpd': None, 'num_empty': 1, 'num_samples': 5, 'num_evaluated': 4}
  setting = {'name': 'topk3_t0.8_g2', 'top_k': 3, 'temperature': 0.8, 'top_p': 1.0, 'guidance': 2.0}
  seen = {}
  grid, captioned = shape_eval.render3d.mesh_grid, img_utils.captioned
  monkeypatch.setattr(shape_eval.render3d, 'mesh_grid', lambda rows, **kw: seen.update(kw) or grid(rows, **kw))
  monkeypatch.setattr(img_utils, 'captioned', lambda img, title, caption: seen.update(
      image=img, title=title, caption=caption) or captioned(img, title, caption))

  def draw(positions, name):
    shape_eval._grid_png(str(tmp_path / name), ev, setting, meshes, labels, {'nn_shape_position': np.array(positions)},
                         result)
    return np.asarray(seen['image'])
  # nearest training shapes: sample 1 (a box) is nearest a sphere (position 2), sample 2 (a sphere) a box
  marked = draw([0, 2, 1, -1, 5], 'marked.png')
  assert seen['row_labels'] == ['sphere\nCOV 0.50 (1/2)', 'box\nCOV 0.33 (1/3)']
  assert seen['title'][0].startswith('sampling topk3_t0.8_g2: top-k 3, temperature 0.8') and \
      'classifier-free guidance 2' in seen['title'][0]
  assert seen['title'][1] == ('COV 0.400, class COV mean 0.417, MMD-CDx100 1.250, 1-NNA 0.700; 1/5 empty, '
                              '4 compared with 5 references')
  with Image.open(tmp_path / 'marked.png') as png:
    assert png.height > marked.shape[0] + 3 * img_utils.LINE      # two title lines and a caption
  clean = draw([0, 3, 0, -1, 5], 'clean.png')
  diff = (marked != clean).any(-1)
  expect = np.zeros_like(diff)
  for i, j in ((1, 0), (0, 1)):                     # sample 1: row 'box', first; sample 2: row 'sphere', second
    x0, y0, x1, y1 = img_utils.tile_box(i, j, shape_eval.GRID_SIZE, shape_eval.GRID_SIZE,
                                        left=shape_eval.GRID_LABEL_WIDTH)
    assert diff[y0:y1 + 1, x0:x1 + 1].any() and (marked[y1, x0:x1 + 1] == img_utils.MARK).all(), (i, j)
    expect[y0:y1 + 1, x0:x1 + 1] = True
  assert diff.any() and not (diff & ~expect).any()


def test_shapes_picture_pairs_every_field_with_its_ground_truth(tmp_path, monkeypatch):
  from test_fit_shapes import shape_config, synthetic_shapes
  from nfjax.fields import mlp
  from nfjax.modalities import shapes as fit_shapes
  data = synthetic_shapes(4, points=256, heldout=4096)
  truth = fit_shapes.truth_mesh(data, 0)          # no meshes in this set: the held-out points voxelised
  assert len(truth[1]) > 0 and np.abs(truth[0]).max() <= 0.5
  box = (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32), np.array([[0, 1, 2]], np.int32))
  rows, cols, cells = fit_shapes.shapes_panels(['f0', 'f1', 'f2'], ['t0', 't1', 't2'], np.array([0.5, 0.9, 0.75, 0.1]),
                                               [np.array([0, 2]), np.array([1])], ['sphere', 'box'])
  assert rows == [['t0', 'f0', 't1', 'f1'], ['t2', 'f2', None, None]]   # (shape, field) per field, rows padded
  assert cols == ['shape', 'field', 'shape', 'field']
  assert cells == [['', 'IoU 0.500', '', 'IoU 0.750'], ['', 'IoU 0.900', '', '']]

  drawn = {}
  monkeypatch.setattr(fit_shapes.meshing, 'mesh_fields', lambda spec, w, *a, **k: [box] * len(w))

  def grid(rows, **kw):
    drawn.update(rows=rows, **kw)
    return Image.new('L', (200, 100))
  monkeypatch.setattr(fit_shapes.render3d, 'mesh_grid', grid)

  class Stage:
    def file(self, name):
      return str(tmp_path / name)
  config = shape_config(**{'fit.num_reconstructions': 4, 'fit.render_resolution': 8})
  spec = mlp.FieldSpec.from_config(config.field)
  arrays = {'weights': np.zeros((4, spec.num_params), np.float32), 'labels': data.labels,
            'quality': np.array([0.91, 0.82, 0.93, 0.84])}
  fit_shapes._shapes_png(Stage(), config, spec, arrays, 0.0, True, ['sphere', 'box'], None, data=data)
  assert [len(r) for r in drawn['rows']] == [4, 4]                 # 2 fields per class, 2 panels per field
  assert all(len(r[0][1]) > 0 and r[1] is box for r in drawn['rows'])   # truth (non-empty) beside the field
  assert drawn['cell_labels'] == [['', 'IoU 0.910', '', 'IoU 0.930'], ['', 'IoU 0.820', '', 'IoU 0.840']]
  assert drawn['row_labels'] == ['sphere', 'box']
  with Image.open(tmp_path / 'shapes.png') as png:
    assert png.width >= 200 and png.height > 100 + 2 * img_utils.LINE


def test_closing_lines_list_every_picture_per_setting_grids_included(tmp_path):
  from nfjax import main
  w = tmp_path / 'work'
  for rel in ('samples/summary.json', 'samples/generation.gif', 'samples/topk3_t0.8/grid.png',
              'samples/topk0_t1_p0.9/grid.png', 'samples/topk3_t0.8/weights.npy', 'fields/shapes.png'):
    os.makedirs(os.path.dirname(w / rel), exist_ok=True)
    (w / rel).write_bytes(b'x')
  lines = main.closing_lines(str(w), ['sample', 'fit'])
  assert len(lines) == 1   # fit is not finished (no summary.json): no line for it
  assert lines[0].startswith(f"sample: {w}/samples/summary.json  pictures: ")
  for pic in ('generation.gif', 'topk3_t0.8/grid.png', 'topk0_t1_p0.9/grid.png'):
    assert pic in lines[0]
  assert 'weights.npy' not in lines[0]

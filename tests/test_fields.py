"""Neural-field MLPs: encoding, flatten order, forward pass against independent numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfjax.errors import ConfigError
from nfjax.fields import mlp

PARITY = mlp.FieldSpec()  # NeF-GPT MNIST field


def np_encode(x, freqs, use_pi, include_input):
  """Reference: nerf-pytorch ordering, written independently with explicit loops."""
  out = []
  for row in x:
    feats = list(row) if include_input else []
    for f in freqs:
      s = f * (math.pi if use_pi else 1.0)
      feats += [math.sin(s * v) for v in row]
      feats += [math.cos(s * v) for v in row]
    out.append(feats)
  return np.array(out, np.float64)


@pytest.mark.parametrize('use_pi,include_input', [(False, False), (True, True), (False, True)])
def test_encoding_matches_numpy_reference(use_pi, include_input):
  spec = mlp.FieldSpec(freqs=(1.0, 2.0, 4.0, 8.0), use_pi=use_pi, include_input=include_input)
  x = np.random.default_rng(0).uniform(-1, 1, (7, 2)).astype(np.float32)
  got = np.asarray(mlp.encode(spec, jnp.asarray(x)))
  want = np_encode(x, spec.freqs, use_pi, include_input)
  assert got.shape == (7, spec.encoded_dims)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_parity_architecture_sizes():
  assert PARITY.encoded_dims == 16
  assert PARITY.num_params == 561
  shapenet = mlp.FieldSpec(in_dims=3, freqs=(1.0, 2.0), include_input=True, hidden=(32,) * 4,
                           activation='gelu', output_bias=False, output_activation='tanh', init='torch_default')
  assert shapenet.encoded_dims == 15 and shapenet.num_params == 3712
  hd = mlp.FieldSpec(in_dims=3, freqs=(1.0, 2.0, 4.0, 8.0), include_input=True, hidden=(128,) * 3)
  assert hd.encoded_dims == 27 and hd.num_params == 36737


def test_layout_is_pytorch_state_dict_order():
  names = [e['name'] for e in PARITY.layout]
  assert names == ['layers.0.weight', 'layers.0.bias', 'layers.1.weight', 'layers.1.bias',
                   'layers.2.weight', 'layers.2.bias']
  assert [tuple(e['shape']) for e in PARITY.layout] == [(16, 16), (16,), (16, 16), (16,), (1, 16), (1,)]
  offsets = [e['offset'] for e in PARITY.layout]
  assert offsets == [0, 256, 272, 528, 544, 560]


def test_flatten_matches_state_dict_reference():
  params = mlp.init(PARITY, jax.random.PRNGKey(1))
  # Reference: what torch's `torch.cat([t.flatten() for t in state_dict.values()])` does:
  # weight (out, in) row-major, then bias, layer by layer.
  ref = []
  for layer in params:
    w = np.asarray(layer['weight'])
    ref += [w[o, i] for o in range(w.shape[0]) for i in range(w.shape[1])]
    ref += list(np.asarray(layer['bias']))
  np.testing.assert_array_equal(np.asarray(mlp.flatten(PARITY, params)), np.array(ref, np.float32))


def test_unflatten_inverts_flatten_with_leading_axes():
  keys = jax.random.split(jax.random.PRNGKey(2), 6).reshape(2, 3, -1)
  params = jax.vmap(jax.vmap(lambda k: mlp.init(PARITY, k)))(keys)
  flat = mlp.flatten(PARITY, params)
  assert flat.shape == (2, 3, 561)
  back = mlp.unflatten(PARITY, flat)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match='560 entries'):
    mlp.unflatten(PARITY, flat[..., :560])


def test_forward_matches_numpy_reference():
  spec = mlp.FieldSpec(hidden=(8, 5), activation='relu', output_bias=False, include_input=True)
  params = mlp.init(spec, jax.random.PRNGKey(3))
  x = np.random.default_rng(1).uniform(0, 1, (10, 2)).astype(np.float32)
  h = np_encode(x, spec.freqs, False, True)
  layers = [(np.asarray(l['weight'], np.float64), np.asarray(l['bias']) if 'bias' in l else 0.0) for l in params]
  for i, (w, b) in enumerate(layers):
    h = h @ w.T + b
    if i < len(layers) - 1:
      h = np.maximum(h, 0)
  np.testing.assert_allclose(np.asarray(mlp.apply(spec, params, jnp.asarray(x))), h, rtol=1e-4, atol=1e-5)
  assert 'bias' not in params[-1]


def test_xavier_relu_init_bounds():
  params = mlp.init(PARITY, jax.random.PRNGKey(4))
  w0 = np.asarray(params[0]['weight'])
  lim = math.sqrt(2) * math.sqrt(6 / 32)
  assert np.abs(w0).max() <= lim and np.abs(w0).max() > 0.8 * lim


def test_pixel_centres_x_is_column_and_centred():
  c = mlp.pixel_centres(28, 28)
  assert c.shape == (784, 2)
  np.testing.assert_allclose(c[0], [0.5 / 28, 0.5 / 28])
  np.testing.assert_allclose(c[1], [1.5 / 28, 0.5 / 28])    # next column: x moves
  np.testing.assert_allclose(c[28], [0.5 / 28, 1.5 / 28])   # next row: y moves
  np.testing.assert_allclose(c[-1], [27.5 / 28, 27.5 / 28])


def test_bad_spec_is_a_config_error():
  with pytest.raises(ConfigError, match='field.activation'):
    mlp.FieldSpec(activation='swishy')
  with pytest.raises(ConfigError, match='no input features'):
    mlp.FieldSpec(freqs=(), include_input=False)

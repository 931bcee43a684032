"""Echo's sampler knobs, each against a direct numpy formula, and the presets that name them."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fields import FakeEchoDiT, fake_inputs

import inference


def initial_noise(seed, shape=(2, 5, 4)):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))


def sample(field, **kw):
    kw.setdefault("cfg_scale", 0.0)
    return inference.sample_latents(field, {}, *fake_inputs(), num_frames=5, progress=False, **kw)


def euler(x, grid, velocity):
    """The reference loop: x += (t_next - t) v(x, t) over the grid, in numpy."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * velocity(x, t)
    return x


LINEAR = FakeEchoDiT(lambda x, t, cond, *_: 0.5 * x + t[:, None, None])


def test_default_grid_and_loop_are_plain_euler_on_linspace():
    grid = np.linspace(1.0, 0.0, 9, dtype=np.float32)
    np.testing.assert_array_equal(inference.timestep_grid(8), grid)
    expect = euler(initial_noise(3), grid, lambda x, t: 0.5 * x + t)
    np.testing.assert_allclose(sample(LINEAR, steps=8, seed=3), expect, rtol=1e-5, atol=1e-6)


def test_t_scale_scales_the_grid_as_echo_does():
    np.testing.assert_allclose(inference.timestep_grid(40, t_scale=0.999), np.linspace(1, 0, 41) * 0.999, atol=1e-7)
    expect = euler(initial_noise(3), np.linspace(1, 0, 7) * 0.999, lambda x, t: 0.5 * x + t)
    np.testing.assert_allclose(sample(LINEAR, steps=6, seed=3, t_scale=0.999), expect, rtol=1e-5, atol=1e-6)


def test_sway_is_f5_tts_schedule_with_t_equal_one_as_noise():
    for s in (-1.0, -0.5, 0.5):
        u = np.linspace(0, 1, 17)
        expect = 1 - (u + s * (np.cos(np.pi / 2 * u) - 1 + u))
        grid = inference.timestep_grid(16, sway=s)
        np.testing.assert_allclose(grid, expect, atol=1e-6)
        assert grid[0] == 1 and abs(grid[-1]) < 1e-6 and np.all(np.diff(grid) < 0)
    # s = -1 spends its steps near the noise end: the first step is smaller than uniform's.
    assert 1 - inference.timestep_grid(16, sway=-1.0)[1] < 1 / 16


def test_truncation_multiplies_the_initial_noise():
    still = FakeEchoDiT(lambda x, *_: jnp.zeros_like(x))
    np.testing.assert_array_equal(sample(still, steps=2, seed=5), initial_noise(5))
    np.testing.assert_allclose(sample(still, steps=2, seed=5, truncation=0.8), 0.8 * initial_noise(5), rtol=1e-6)


def rescale_numpy(v, x, t, k, sigma):
    if t >= 1:
        return v
    snr = (1 - t) ** 2 / t ** 2
    ratio = (snr * sigma ** 2 + 1) / (snr * sigma ** 2 / k + 1)
    return 1 / (1 - t) * (ratio * ((1 - t) * v + x) - x)


def test_temporal_score_rescaling_follows_the_paper_formula():
    rng = np.random.default_rng(0)
    v, x = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    for t in (0.999, 0.7, 0.2):
        np.testing.assert_allclose(np.asarray(inference.temporal_score_rescale(v, x, t, 1.2, 3.0)),
                                   rescale_numpy(v, x, t, 1.2, 3.0), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(inference.temporal_score_rescale(v, x, t, 1.0, 3.0)), v, rtol=1e-9)
    # In the sampler: skipped at t = 1, applied below.
    grid = inference.timestep_grid(5)
    expect = euler(initial_noise(3), grid, lambda x, t: rescale_numpy(0.5 * x + t, x, t, 1.2, 3.0))
    np.testing.assert_allclose(sample(LINEAR, steps=5, seed=3, rescale_k=1.2, rescale_sigma=3.0), expect,
                               rtol=1e-4, atol=1e-5)


def test_speaker_force_scales_speaker_keys_and_values_of_the_first_layers_while_t_is_high():
    def velocity(x, t, cond, *_):  # reads layer 0's and layer 1's speaker keys/values (positions 3-5)
        k, v = cond["k"][:, :, 3:, 0, 0], cond["v"][:, :, 3:, 0, 0]
        return jnp.zeros_like(x) + (k[0] + 10 * k[1] + 100 * v[0]).mean(1)[:, None, None]
    field = FakeEchoDiT(velocity)
    grid = inference.timestep_grid(6)
    got = sample(field, steps=6, seed=1, speaker_kv_scale=1.5, speaker_kv_min_t=0.5, speaker_kv_max_layers=1)
    # layer 0 scaled (k and v) while t >= 0.5, layer 1 never; all ones otherwise.
    expect = euler(initial_noise(1), grid, lambda x, t: np.full_like(x, (1.5 + 10 + 150) if t >= 0.5 else 111.0))
    np.testing.assert_allclose(got, expect, rtol=1e-5)
    every = sample(field, steps=6, seed=1, speaker_kv_scale=1.5, speaker_kv_min_t=0.0)  # all layers, all t
    np.testing.assert_allclose(every, euler(initial_noise(1), grid, lambda x, t: np.full_like(x, 1.5 + 15 + 150)),
                               rtol=1e-5)
    text_only = FakeEchoDiT(lambda x, t, cond, *_: jnp.zeros_like(x) + cond["k"][0, :, :3, 0, 0].mean(1)[:, None, None])
    np.testing.assert_allclose(sample(text_only, steps=6, seed=1, speaker_kv_scale=3.0, speaker_kv_min_t=0.0),
                               sample(text_only, steps=6, seed=1), rtol=1e-6)  # text keys are never scaled


def test_presets_are_echos_and_flags_override_them(tmp_path):
    assert set(inference.SAMPLER_PRESETS) == {
        "Independent-High-Speaker-CFG", "Independent-High-Speaker-CFG-Flat", "Independent-High-CFG",
        "Independent-High-CFG-Flat", "Independent-Low-CFG", "Independent-Low-CFG-Flat"}
    flat = inference.SAMPLER_PRESETS["Independent-High-Speaker-CFG-Flat"]
    assert flat == {"steps": 40, "cfg_text": 3.0, "cfg_speaker": 8.0, "cfg_min_t": 0.5, "cfg_max_t": 1.0,
                    "truncation": 0.8, "rescale_k": 1.2, "rescale_sigma": 3.0, "t_scale": 0.999}
    args = inference.parse_args(["--sampler_preset", "Independent-High-Speaker-CFG-Flat", "--steps", "8",
                                 "--cfg_text", "2.5"])
    resolved = inference.resolve_sampler(args)
    assert resolved["steps"] == 8 and resolved["cfg_text"] == 2.5 and resolved["cfg_speaker"] == 8.0
    assert resolved["truncation"] == 0.8 and resolved["speaker_kv_scale"] is None
    assert inference.resolve_sampler(inference.parse_args([])) == inference.SAMPLER_DEFAULTS
    # Echo's own file format (string values, its key names) as a user presets file.
    mine = tmp_path / "presets.json"
    mine.write_text(json.dumps({"Mine": {"num_steps": "12", "cfg_scale_text": "4.0", "truncation_factor": "0.9",
                                         "sway": -1}}))
    args = inference.parse_args(["--sampler_presets", str(mine), "--sampler_preset", "Mine"])
    resolved = inference.resolve_sampler(args)
    assert (resolved["steps"], resolved["cfg_text"], resolved["truncation"], resolved["sway"]) == (12, 4.0, 0.9, -1.0)
    with pytest.raises(inference.InferenceError, match="known presets: Independent-High-Speaker-CFG, .*Mine"):
        inference.resolve_sampler(inference.parse_args(["--sampler_presets", str(mine), "--sampler_preset", "X"]))
    mine.write_text(json.dumps({"Bad": {"num_steps": "many"}}))
    with pytest.raises(inference.InferenceError, match="'Bad' sets num_steps to 'many'"):
        inference.resolve_sampler(inference.parse_args(["--sampler_presets", str(mine), "--sampler_preset", "Bad"]))


def test_list_presets_prints_every_preset(capsys):
    assert inference.main(["--list_presets"]) == 0
    out = capsys.readouterr().out
    for name in inference.SAMPLER_PRESETS:
        assert f"{name}: steps=40" in out

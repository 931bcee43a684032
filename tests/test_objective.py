"""The training objective and the shared sampler, asserted on numbers: a sign flip, a wrong
dropout rate, a schedule off by a step or a decayed norm each fail here."""
import argparse
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm as normal_dist

import inference
import model as echo
import train_pretrain
from fields import FakeEchoDiT, fake_inputs


def test_flow_matching_pair_is_the_straight_path_from_data_to_noise():
    x0 = np.array([[[1.0, -2.0]]], np.float32)
    noise = np.array([[[3.0, 0.5]]], np.float32)
    x_t, target = train_pretrain.flow_matching_pair(x0, noise, np.array([0.25], np.float32))
    np.testing.assert_allclose(x_t, [[[0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 0.5]]])
    np.testing.assert_allclose(target, [[[3.0 - 1.0, 0.5 + 2.0]]])  # noise - x0, not x0 - noise
    for t, expect in ((0.0, x0), (1.0, noise)):
        np.testing.assert_allclose(train_pretrain.flow_matching_pair(x0, noise, np.array([t], np.float32))[0], expect)


def test_stratified_timesteps_are_logit_normal_quantiles_one_per_stratum():
    for seed in range(5):
        batch = 64
        t = np.asarray(train_pretrain.stratified_timesteps(jax.random.key(seed), batch), np.float64)
        assert t.shape == (batch,) and np.all((t > 0) & (t < 1)) and len(np.unique(t)) == batch
        # Under the logit-normal CDF (Phi of logit t), exactly one t falls in each of the B strata.
        u = normal_dist.cdf(np.log(t / (1 - t)))
        assert sorted(np.floor(u * batch).astype(int)) == list(range(batch))
        # and all share one offset within their stratum
        offsets = u * batch - np.floor(u * batch)
        np.testing.assert_allclose(offsets, offsets[0], atol=1e-4)
    # Over many steps the marginal is logit-normal(0, 1): median 0.5, quartiles at sigmoid(+-0.674).
    many = np.concatenate([np.asarray(train_pretrain.stratified_timesteps(jax.random.key(s), 16))
                           for s in range(400)])
    q = np.quantile(many, [0.25, 0.5, 0.75])
    np.testing.assert_allclose(q, 1 / (1 + np.exp(-np.array([-0.6745, 0.0, 0.6745]))), atol=0.01)


def test_cfg_dropout_drops_text_and_speaker_ten_percent_each_independently():
    keep_text, keep_spk = map(np.asarray, train_pretrain.cfg_dropout(jax.random.key(3), 200_000))
    assert set(np.unique(keep_text)) == {0, 1} and set(np.unique(keep_spk)) == {0, 1}
    assert abs((1 - keep_text).mean() - 0.1) < 0.003 and abs((1 - keep_spk).mean() - 0.1) < 0.003
    assert abs(((1 - keep_text) * (1 - keep_spk)).mean() - 0.01) < 0.001  # independent


def test_prefix_training_cuts_blocks_on_patches_and_moves_each_to_the_front():
    x0 = jnp.arange(2 * 12, dtype=jnp.float32).reshape(2, 12, 1)
    block, frames_mask = train_pretrain.continuation(x0, jnp.array([0, 8]), jnp.array([12, 12]))
    np.testing.assert_array_equal(block[0, :, 0], np.arange(12))
    np.testing.assert_array_equal(block[1, :4, 0], np.arange(20, 24))  # frames 8-11 of row 1, at the front
    np.testing.assert_array_equal(frames_mask, [[1] * 12, [1] * 4 + [0] * 8])  # past the canvas: not there
    _, frames_mask = train_pretrain.continuation(x0, jnp.array([4, 0]), jnp.array([8, 4]))
    np.testing.assert_array_equal(frames_mask, [[1] * 4 + [0] * 8, [1] * 4 + [0] * 8])  # blocks ending inside
    # Blocks: the whole canvas with probability 1 - prob; else a start uniform over the patch
    # boundaries before the canvas's end, the end at the canvas's end half the time, else uniform
    # over the boundaries after the start.
    start, end = map(np.asarray, train_pretrain.prefix_splits(jax.random.key(0), 60_000, 12, 4, 0.5))
    whole = (start == 0) & (end == 12)
    assert abs(np.mean(whole) - (0.5 + 0.5 / 3 * (0.5 + 0.5 / 3))) < 0.01
    assert set(start.tolist()) == {0, 4, 8} and np.all(end > start) and np.all(end % 4 == 0) and np.all(end <= 12)
    split = start > 0
    assert abs(np.mean(start[split] == 4) - 0.5) < 0.02
    assert abs(np.mean(end[start == 4] == 8) - 0.25) < 0.02  # 1/2 x 1/2: not to the end, then 8 of (8, 12)
    assert abs(np.mean(end[start == 8] == 12) - 1.0) < 1e-9
    for seed in range(6):
        prefix, block = train_pretrain.prefix_inputs(jax.random.key(seed), x0, 4, 1.0)
        for row in range(2):
            s = int(prefix["start_pos"][row])
            e = s + int(prefix["frames_mask"][row].sum())
            assert s in (0, 4, 8) and e in (4, 8, 12) and e > s
            np.testing.assert_array_equal(prefix["prefix_latent"][row, :, 0],
                                          np.where(np.arange(12) < s, x0[row, :, 0], 0))  # clean, and only before
            np.testing.assert_array_equal(block[row, :e - s, 0], x0[row, s:e, 0])
            np.testing.assert_array_equal(prefix["frames_mask"][row], np.arange(12) < e - s)


def optimizer_args(**kw):
    return argparse.Namespace(**dict(dict(lr=2e-3, steps=1000, warmup_frac=0.05, weight_decay=0.01), **kw))


def schedule_of(args):
    return lambda step: train_pretrain.learning_rate(step, train_pretrain.schedule_values(args))


def test_learning_rate_schedule_warms_up_then_decays_to_zero():
    schedule = schedule_of(optimizer_args())
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(2e-3)  # peak at the end of the 5% warm-up
    assert float(schedule(25)) == pytest.approx(1e-3)
    assert float(schedule(525)) == pytest.approx(1e-3, rel=1e-3)  # cosine: half way down half way through
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-12)
    for steps in (1, 2, 19):  # runs too short for a 5% warm-up still get a schedule
        schedule = schedule_of(optimizer_args(steps=steps))
        assert float(schedule(0)) == 0.0 and float(schedule(max(steps - 1, 1))) >= 0.0


def test_the_schedule_is_optaxs_warmup_cosine_to_the_bit():
    """The step takes its schedule as values; the rates are those of optax's schedule compiled with
    its numbers as constants (as the step was before), bit for bit: a run trains exactly as before."""
    import optax
    for steps, lr, warmup_frac, data in ((1000, 2e-3, 0.05, "/shards"), (37, 3e-4, 0.1, "/shards"),
                                         (5, 1e-3, 0.0, "/shards"), (4000, 2e-3, 0.05, "synthetic"),
                                         (2500, 2e-3, 0.05, "synthetic")):
        args = optimizer_args(steps=steps, lr=lr, warmup_frac=warmup_frac, data=data, synthetic_corpus="medium")
        primed = train_pretrain.primer_steps(args)

        def stage(length):
            warmup = max(int(warmup_frac * length), 1)
            return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(length, warmup + 1), 0.0)
        oracle = optax.join_schedules([stage(primed), stage(steps - primed)], [primed]) if primed else stage(steps)
        counts, values = np.arange(steps + 3, dtype=np.int32), train_pretrain.schedule_values(args)
        expected = np.asarray(jax.jit(jax.vmap(oracle))(counts))
        traced = jax.jit(jax.vmap(train_pretrain.learning_rate, in_axes=(0, None)))
        np.testing.assert_array_equal(np.asarray(traced(counts, values)), expected)
        one_count, one_count_oracle = jax.jit(train_pretrain.learning_rate), jax.jit(oracle)  # as in the step
        for count in counts[:: max(1, steps // 200)]:
            assert one_count(count, values) == one_count_oracle(count), count


def test_a_new_data_stage_warms_up_again_with_fresh_adam_moments():
    import optax
    args = optimizer_args(steps=200, data="synthetic", synthetic_corpus="medium")
    assert train_pretrain.primer_steps(args) == 140  # the demo's primer: the first 70%
    assert train_pretrain.primer_steps(optimizer_args(steps=200, data="/shards")) == 0
    tx, schedule = train_pretrain.make_optimizer(args), schedule_of(args)
    assert [float(schedule(s)) for s in (0, 7, 140, 143)] == pytest.approx([0.0, 2e-3, 0.0, 2e-3])
    assert float(schedule(139)) == pytest.approx(0.0, abs=1e-6) and float(schedule(171)) == pytest.approx(1e-3, rel=0.1)
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update({"w": jnp.array([1.0, -2.0, 3.0])}, state, params)
    fresh = train_pretrain.restart_moments(tx, state, params)
    leaves = lambda s, kind: [n for n in jax.tree.leaves(s, is_leaf=lambda n: isinstance(n, kind))
                              if isinstance(n, kind)]
    adam, = leaves(fresh, optax.ScaleByAdamState)
    assert int(adam.count) == 0 and not np.any(adam.mu["w"]) and not np.any(adam.nu["w"])
    assert np.any(leaves(state, optax.ScaleByAdamState)[0].mu["w"])
    assert [int(s.count) for s in leaves(fresh, optax.ScaleByScheduleState)] == [3]  # the schedule runs on


def test_weight_decay_shrinks_kernels_and_embeddings_only():
    config = echo.PRESETS["tiny"]
    params = jax.tree.map(jnp.ones_like, __import__("flax.linen", fromlist=["unbox"]).unbox(
        echo.init_params(config, jax.random.key(0))))
    args = optimizer_args(warmup_frac=0.0, steps=10)
    tx, schedule = train_pretrain.make_optimizer(args), schedule_of(args)
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, opt_state = tx.update(zeros, tx.init(params), params)  # step 0 has lr 0: look at step 1
    updates, _ = tx.update(zeros, opt_state, params)  # zero gradients: what moves is weight decay alone
    decayed = {k for k, v in echo.flatten(updates).items() if np.any(np.asarray(v) != 0)}
    names = set(echo.flatten(params))
    never = [k for k in names if any(s in k for s in ("bias", "norm", "adaln", "cond_dense_global", "wgate"))]
    assert never and not decayed & set(never), sorted(decayed & set(never))[:5]
    must = [k for k in names if k.endswith(("kernel", "embedding")) and k not in never]
    assert must and set(must) <= decayed, sorted(set(must) - decayed)[:5]
    one = next(k for k in must)
    np.testing.assert_allclose(np.asarray(echo.flatten(updates)[one]), -float(schedule(1)) * 0.01, rtol=1e-5)


def aim_at(targets):
    """A velocity field that carries x_t in a straight line to a known x0, one per set of conditions."""
    def velocity(x, t, cond, has_text, has_speaker):
        b = targets[(True, True)].shape[0]
        target = jnp.zeros_like(x)
        for (ht, hs), x0 in targets.items():
            pick = (has_text == ht) & (has_speaker == hs)
            target = jnp.where(pick[:, None, None], jnp.tile(x0, (x.shape[0] // b, 1, 1)), target)
        return (x - target) / t[:, None, None]
    return FakeEchoDiT(velocity)


@pytest.mark.parametrize("steps", [1, 4, 16])
def test_euler_sampler_lands_on_the_point_the_velocity_field_aims_at(steps):
    rng = np.random.default_rng(0)
    x0, x_uncond, x_no_text, x_no_spk = (rng.normal(size=(2, 5, 4)).astype(np.float32) for _ in range(4))
    field = aim_at({(True, True): x0, (False, False): x_uncond, (False, True): x_no_text, (True, False): x_no_spk})
    sample = lambda **kw: inference.sample_latents(field, {}, *fake_inputs(), steps=steps, num_frames=5,
                                                   progress=False, **kw)
    np.testing.assert_allclose(sample(cfg_scale=0.0), x0, atol=1e-5)
    # Joint guidance v_c + s (v_c - v_u) aims at x0 + s (x0 - x_uncond).
    np.testing.assert_allclose(sample(cfg_scale=2.0), x0 + 2.0 * (x0 - x_uncond), atol=1e-4)
    # Independent guidance: one term per dropped condition.
    np.testing.assert_allclose(sample(cfg_text=3.0, cfg_speaker=0.5),
                               x0 + 3.0 * (x0 - x_no_text) + 0.5 * (x0 - x_no_spk), atol=1e-4)

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import DATA, REPO

from checkpoint import params_from_checkpoint
from model import (PRESETS, EchoConfig, EchoDiT, abstract_params, count_params, dummy_inputs,
                   export_reference_params, flops_per_sample, import_reference_params, init_params,
                   logical_axis_rules, params_from_echo_torch, params_to_echo_torch)

VECTORS = os.path.join(DATA, "echo_dit_tiny")


@pytest.fixture(scope="module")
def reference():
    with open(os.path.join(VECTORS, "config.json")) as f:
        config = EchoConfig.from_reference(json.load(f))
    flat = dict(np.load(os.path.join(VECTORS, "params.npz")))
    inputs = np.load(os.path.join(VECTORS, "inputs.npz"))
    args = tuple(inputs[k] for k in ("x", "t", "text_input_ids", "text_mask", "speaker_latent", "speaker_mask"))
    expected = np.load(os.path.join(VECTORS, "expected.npz"))["out"]
    return config, flat, args, expected


def run(config, params, *args):
    return np.asarray(jax.jit(EchoDiT(config).apply)({"params": params}, *args))


@pytest.mark.parametrize("scan_layers, unroll_scan", [(True, False), (True, True), (False, False)])
def test_parity_with_reference_vectors(reference, scan_layers, unroll_scan):
    """Scanned, scanned but unrolled in the program (a multi-process CPU run), and unrolled layers."""
    config, flat, args, expected = reference
    config = dataclasses.replace(config, scan_layers=scan_layers, unroll_scan=unroll_scan)
    out = run(config, import_reference_params(flat, config), *args)
    assert out.dtype == np.float32 and out.shape == expected.shape
    assert np.abs(out - expected).max() < 1e-4
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-5


def test_export_import_round_trip_is_lossless(reference):
    config, flat, _, _ = reference
    params = import_reference_params(flat, config)
    back = export_reference_params(params, config)
    assert sorted(back) == sorted(flat)
    for k in flat:
        assert np.array_equal(back[k], flat[k]), k
    again = import_reference_params(back, config)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        assert np.array_equal(a, b)
    # Fresh params (not from the vectors) survive export -> import too.
    fresh = nn.unbox(init_params(config, jax.random.key(3)))
    for a, b in zip(jax.tree.leaves(import_reference_params(export_reference_params(fresh, config), config)),
                    jax.tree.leaves(fresh)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("trained_scanned", [True, False])
def test_a_checkpoint_loads_into_either_layout(reference, trained_scanned):
    """A checkpoint in our layout, trained stacked or unrolled (the demo preset unrolls), loads into a
    model of either layout (inference stacks) with the same output."""
    config, flat, args, expected = reference
    trained = dataclasses.replace(config, scan_layers=trained_scanned)
    payload = {"params": import_reference_params(flat, trained)}
    for scanned in (True, False):
        target = dataclasses.replace(config, scan_layers=scanned)
        out = run(target, params_from_checkpoint(payload, target), *args)
        assert np.abs(out - expected).max() < 1e-4


def test_import_rejects_layouts_that_do_not_fit(reference):
    config, flat, _, _ = reference
    bad = dict(flat)
    del bad["TransformerBlock_1/mlp/w2/kernel"]
    bad["TransformerBlock_2/mlp/w2/kernel"] = np.zeros((176, 64), np.float32)
    bad["norm/weight"] = np.ones((65,), np.float32)
    with pytest.raises(ValueError) as err:
        import_reference_params(bad, config)
    msg = str(err.value)
    assert "missing: TransformerBlock_1/mlp/w2/kernel" in msg
    assert "unexpected: TransformerBlock_2/mlp/w2/kernel" in msg
    assert "norm/weight (65,) != (64,)" in msg


def test_preset_param_counts():
    assert count_params(PRESETS["1.3B"]) == 1_304_156_288
    assert count_params(PRESETS["840M"]) == 843_223_936
    assert count_params(PRESETS["tiny"]) == 353_680  # the reference vectors' exact count
    # The -blockwise variants add the latent encoder (as large as the speaker encoder), its norm and
    # each decoder block's wk_latent and wv_latent, and nothing else.
    for name in ("1.3B", "840M", "demo", "tiny"):
        c = PRESETS[name]
        encoder = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract_params(c))["speaker_encoder"]))
        added = encoder + c.encoder_model_size + c.num_layers * 2 * c.encoder_model_size * c.model_size
        assert count_params(PRESETS[f"{name}-blockwise"]) == count_params(c) + added, name


@pytest.mark.parametrize("preset", ["1.3B", "1.3B-blockwise"])
def test_every_param_has_logical_axes(preset):
    boxed = abstract_params(PRESETS[preset])
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)
    # Every weight with at least 1M entries is sharded over fsdp.
    rules = dict(logical_axis_rules())
    for x in leaves:
        if x.value.size >= 1 << 20:
            assert any(rules.get(n) == "fsdp" for n in x.names), x.names


def test_masked_text_and_speaker_padding_do_not_change_output(reference):
    config, flat, args, _ = reference
    params = import_reference_params(flat, config)
    x, t, text_ids, text_mask, spk, spk_mask = args
    base = run(config, params, *args)
    ids2 = text_ids.copy()
    ids2[text_mask == 0] = 77
    spk2 = spk.copy()
    spk2[1, -4:] = 100.0  # row 1's last 6 frames are masked: the last patch is fully masked
    out = run(config, params, x, t, ids2, text_mask, spk2, spk_mask)
    np.testing.assert_array_equal(out, base)
    # Sanity: the same change in a visible position does change the output.
    ids3 = text_ids.copy()
    ids3[0, 3] = 77
    assert np.abs(run(config, params, x, t, ids3, text_mask, spk, spk_mask) - base).max() > 1e-6


def test_all_conditions_dropped_gives_finite_output(reference):
    config, flat, args, _ = reference
    params = import_reference_params(flat, config)
    x, t, text_ids, text_mask, spk, spk_mask = args
    out = run(config, params, x, t, text_ids, np.zeros_like(text_mask), np.zeros_like(spk), np.zeros_like(spk_mask))
    assert np.isfinite(out).all()


def test_speaker_encoder_is_causal(reference):
    config, flat, args, _ = reference
    params = import_reference_params(flat, config)
    spk = args[4]
    encode = jax.jit(lambda p, s: EchoDiT(config).apply(
        {"params": p}, s, method=lambda m, s: m.speaker_norm(m.speaker_encoder(s))))
    a = np.asarray(encode(params, spk))
    spk2 = spk.copy()
    spk2[:, -4:] += 3.0  # the last patch
    b = np.asarray(encode(params, spk2))
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
    assert np.abs(a[:, -1] - b[:, -1]).max() > 1e-3


def test_zero_output_at_init(reference):
    config, _, args, _ = reference
    params = nn.unbox(init_params(config, jax.random.key(0)))
    out = run(config, params, *args)
    assert out.shape == args[0].shape and not out.any()


def test_bfloat16_compute_is_close_to_float32(reference):
    config, flat, args, expected = reference
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    out = run(bf16, import_reference_params(flat, bf16), *args)
    rel = np.linalg.norm(out - expected) / np.linalg.norm(expected)
    assert out.dtype == np.float32 and 1e-6 < rel < 2e-2


def test_cached_conditions_match_full_call_and_cfg_dropout(reference):
    """encode_conditions once + decode per step == the full call; a zeroed mask == dropped conditions."""
    config, flat, args, expected = reference
    params = {"params": import_reference_params(flat, config)}
    model = EchoDiT(config)
    x, t, text_ids, text_mask, spk, spk_mask = args
    cond = model.apply(params, text_ids, text_mask, spk, spk_mask, method=EchoDiT.encode_conditions)
    L, B = config.num_layers, x.shape[0]
    assert cond["k"].shape == (L, B, text_ids.shape[1] + spk.shape[1] // 4, 4, 16)
    out = np.asarray(model.apply(params, x, t, cond, method=EchoDiT.decode))
    assert np.abs(out - expected).max() < 1e-5
    dropped = dict(cond, mask=jnp.zeros_like(cond["mask"]))
    uncond = np.asarray(model.apply(params, x, t, dropped, method=EchoDiT.decode))
    full_uncond = run(config, params["params"], x, t, text_ids, np.zeros_like(text_mask),
                      np.zeros_like(spk), np.zeros_like(spk_mask))
    assert np.abs(uncond - full_uncond).max() < 1e-5


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_policies_give_the_same_gradients(reference, remat):
    config, flat, args, _ = reference
    params = import_reference_params(flat, config)

    def grads(cfg):
        loss = lambda p: jnp.mean(EchoDiT(cfg).apply({"params": p}, *args) ** 2)
        return jax.jit(jax.grad(loss))(params)

    for a, b in zip(jax.tree.leaves(grads(config)), jax.tree.leaves(grads(dataclasses.replace(config, remat=remat)))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_fsdp_sharded_output_matches_unsharded(reference):
    config, flat, args, _ = reference
    params = import_reference_params(flat, config)
    # A batch of 8 so that it splits over (data, fsdp) = (2, 4).
    rng = np.random.default_rng(0)
    x, t, ids, tmask, spk, smask = (np.concatenate([a] * 4) for a in args)
    x = x + rng.normal(size=x.shape).astype(np.float32)
    t = rng.uniform(size=t.shape).astype(np.float32)
    batch = (x, t, ids, tmask, spk, smask)
    expected = run(config, params, *batch)

    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = logical_axis_rules()
    specs = nn.get_partition_spec(abstract_params(config))
    param_shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    sharded = jax.device_put(params, param_shardings)
    kernel = sharded["layers"]["mlp"]["w1"]["kernel"]  # (layers, embed, mlp)
    assert kernel.sharding.spec[1] == "fsdp" and len(kernel.addressable_shards[0].data) == kernel.shape[0]
    assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 4
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    batch = jax.device_put(batch, batch_sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(EchoDiT(config).apply)({"params": sharded}, *batch)
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


def test_scanned_program_size_does_not_grow_with_depth():
    """Compile cost follows program size: with scan, 24 layers lower to the same HLO as 2."""
    def hlo_size(num_layers):
        cfg = dataclasses.replace(PRESETS["tiny"], num_layers=num_layers, text_num_layers=num_layers,
                                  encoder_num_layers=num_layers)
        params = abstract_params(cfg)
        from model import dummy_inputs
        return len(jax.jit(EchoDiT(cfg).apply).lower({"params": nn.unbox(params)}, *dummy_inputs(cfg)).as_text())

    small, deep = hlo_size(2), hlo_size(24)
    assert deep < 1.05 * small


def test_flops_per_sample_matches_xla_cost_analysis():
    cfg = dataclasses.replace(PRESETS["tiny"], scan_layers=False)
    from model import dummy_inputs
    inputs = dummy_inputs(cfg, batch=2, latent_len=32, text_len=16, speaker_len=16)
    params = nn.unbox(abstract_params(cfg))
    compiled = jax.jit(EchoDiT(cfg).apply).lower({"params": params}, *inputs).compile()
    xla = compiled.cost_analysis()["flops"]
    ours = 2 * flops_per_sample(cfg, 32, 16, 16, training=False)
    # XLA also counts elementwise work (norms, softmax, RoPE) that model FLOPs leave out.
    assert 0.85 < ours / xla <= 1.0


def test_self_check_command():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(REPO, "model.py")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "1.3B: 1,304,156,288 parameters" in out.stdout and "(ok)" in out.stdout


def test_custom_gradients_match_plain_autodiff():
    """The CPU-friendly backward passes of matmul and attention are exact, masks and causality included."""
    from model import attention, matmul

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    q, k, v = (jnp.asarray(rng.normal(size=(2, s, 3, 4)), jnp.float32) for s in (5, 7, 7))
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3])

    def plain_attention(q, k, v, key_mask, causal):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
        allowed = key_mask.astype(bool)[:, None, None, :]
        if causal:
            allowed = allowed & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        probs = jax.nn.softmax(jnp.where(allowed, logits, -1e9), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(matmul(x, w))), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for causal in (False, True):
        kk, vv = (k[:, :5], v[:, :5]) if causal else (k, v)
        m = mask[:, :5] if causal else mask
        ours = jax.grad(lambda *a: jnp.sum(jnp.sin(attention(*a, m, causal))), argnums=(0, 1, 2))(q, kk, vv)
        ref = jax.grad(lambda *a: jnp.sum(jnp.sin(plain_attention(*a, m, causal))), argnums=(0, 1, 2))(q, kk, vv)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Echo's published PyTorch model (PyPI echo-tts 0.1.4, random weights) as the oracle

ECHO_TORCH_ARGS = dict(latent_size=128, model_size=64, num_layers=3, num_heads=4, intermediate_size=176,
                       norm_eps=1e-5, text_vocab_size=256, text_model_size=48, text_num_layers=2, text_num_heads=2,
                       text_intermediate_size=132, speaker_patch_size=4, speaker_model_size=32,
                       speaker_num_layers=2, speaker_num_heads=2, speaker_intermediate_size=88,
                       timestep_embed_size=32, adaln_rank=8)


@pytest.fixture(scope="module")
def echo_torch():
    """echo_tts.model.EchoDiT with random weights (its model.py alone: the package's __init__ imports
    its codec's dependencies, which this project does not install)."""
    spec = importlib.util.find_spec("echo_tts")
    if spec is None:
        pytest.fail("the test oracle is missing: pip install --no-deps echo-tts==0.1.4 (as .ci/run does)")
    module_spec = importlib.util.spec_from_file_location(
        "echo_tts_model", os.path.join(spec.submodule_search_locations[0], "model.py"))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    generator = torch.Generator().manual_seed(0)
    net = module.EchoDiT(**ECHO_TORCH_ARGS).float().eval()
    with torch.no_grad():  # far from init (zero output layers, unit norms), so every path shows
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.3 if p.ndim == 1 else 0.15) + (p.ndim == 1))
    return net


def echo_torch_inputs(seed=0):
    rng = np.random.default_rng(seed)
    b, s, st, ss, sp = 2, 24, 20, 32, 16
    ids = rng.integers(1, 256, size=(b, st)).astype(np.int32)
    ids[:, 0] = 0
    tmask = np.ones((b, st), bool)
    tmask[1, 14:] = False
    smask = np.ones((b, ss), bool)
    smask[0, 20:] = False
    return dict(x=rng.normal(size=(b, s, 128)).astype(np.float32), t=np.array([0.3, 0.8], np.float32), ids=ids,
                tmask=tmask, spk=rng.normal(size=(b, ss, 128)).astype(np.float32), smask=smask,
                prefix=rng.normal(size=(b, sp, 128)).astype(np.float32))


def echo_torch_forward(net, i, start_pos=None):
    with torch.no_grad():
        text = net.get_kv_cache_text(torch.from_numpy(i["ids"]).long(), torch.from_numpy(i["tmask"]))
        speaker = net.get_kv_cache_speaker(torch.from_numpy(i["spk"]))
        prefix = None if start_pos is None else net.get_kv_cache_latent(torch.from_numpy(i["prefix"]))
        return net(torch.from_numpy(i["x"]), torch.from_numpy(i["t"]), torch.from_numpy(i["tmask"]),
                   torch.from_numpy(i["smask"]), text, speaker, start_pos=start_pos, kv_cache_latent=prefix).numpy()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_parity_with_the_published_model(echo_torch, scan_layers):
    """Our forward equals echo_tts 0.1.4's, without a prefix and with one: a prefix that ends at
    start_pos, one whose last patch lies at start_pos or beyond (masked), and one that starts
    mid-patch."""
    config = dataclasses.replace(EchoConfig.from_echo_torch(ECHO_TORCH_ARGS), scan_layers=scan_layers)
    state_dict = {k: v.numpy().copy() for k, v in echo_torch.state_dict().items()}
    params = params_from_echo_torch(state_dict, config)
    back = params_to_echo_torch(params, config)
    assert set(back) == set(state_dict)
    for name, array in state_dict.items():
        np.testing.assert_array_equal(back[name], array, err_msg=name)
    i = echo_torch_inputs()
    apply = jax.jit(EchoDiT(config).apply)
    args = (i["x"], i["t"], i["ids"], i["tmask"], i["spk"], i["smask"])
    outputs = []
    for start_pos in (None, 16, 10, 3):
        want = echo_torch_forward(echo_torch, i, start_pos)
        extra = {} if start_pos is None else dict(prefix_latent=i["prefix"], start_pos=start_pos)
        got = np.asarray(apply({"params": params}, *args, **extra))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"start_pos {start_pos}")
        outputs.append(got)
    assert all(np.abs(a - outputs[0]).max() > 1e-3 for a in outputs[1:])  # the prefix is used


def test_published_weights_that_do_not_fit_are_refused(echo_torch):
    config = EchoConfig.from_echo_torch(ECHO_TORCH_ARGS)
    state_dict = {k: v.numpy() for k, v in echo_torch.state_dict().items()}
    with pytest.raises(ValueError, match="missing blocks.2.attention.wk_latent.weight"):
        params_from_echo_torch({k: v for k, v in state_dict.items() if k != "blocks.2.attention.wk_latent.weight"},
                               config)
    with pytest.raises(ValueError, match="unexpected extra.weight"):
        params_from_echo_torch({**state_dict, "extra.weight": np.zeros(3)}, config)
    with pytest.raises(ValueError, match="does not give"):
        params_from_echo_torch(state_dict, dataclasses.replace(config, adaln_rank=4))
    with pytest.raises(ValueError, match="not arguments of Echo's published EchoDiT: depth"):
        EchoConfig.from_echo_torch({**ECHO_TORCH_ARGS, "depth": 3})


def test_a_prefix_counts_only_before_start_pos():
    """A prefix wholly at or after start_pos changes nothing; the decode at start_pos takes its
    positions from there (the same frames decoded at another position differ); (B,) start
    positions equal one call per row."""
    config = PRESETS["tiny-blockwise"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * (0.3 if p.ndim == 1 else 0.15)
                          + (p.ndim == 1), nn.unbox(init_params(config, jax.random.key(0))))  # far from init
    x, t, ids, tmask, spk, smask = dummy = [np.asarray(a) for a in dummy_inputs(config, batch=2, latent_len=12)]
    x = rng.normal(size=x.shape).astype(np.float32)
    t = np.array([0.4, 0.7], np.float32)
    ids = rng.integers(1, 256, size=ids.shape).astype(np.int32)
    spk = rng.normal(size=spk.shape).astype(np.float32)
    prefix = rng.normal(size=(2, 8, config.latent_size)).astype(np.float32)
    args = (x, t, ids, tmask, spk, smask)
    apply = jax.jit(EchoDiT(config).apply)
    plain = np.asarray(apply({"params": params}, *args))
    np.testing.assert_allclose(np.asarray(apply({"params": params}, *args, prefix_latent=prefix, start_pos=0)),
                               plain, atol=1e-5)
    shifted = np.asarray(apply({"params": params}, *args, prefix_latent=prefix, start_pos=8))
    assert np.abs(shifted - plain).max() > 1e-3
    rows = np.asarray(apply({"params": params}, *args, prefix_latent=prefix, start_pos=np.array([8, 4])))
    np.testing.assert_allclose(rows[0], shifted[0], atol=1e-6)
    one_by_one = np.asarray(apply({"params": params}, *(a[1:] for a in args), prefix_latent=prefix[1:], start_pos=4))
    np.testing.assert_allclose(rows[1], one_by_one[0], atol=1e-4)
    with pytest.raises(ValueError, match="no latent-prefix path"):
        plain_params = nn.unbox(init_params(PRESETS["tiny"], jax.random.key(0)))
        EchoDiT(PRESETS["tiny"]).apply({"params": plain_params}, *dummy, prefix_latent=prefix)
    # A block that ends inside the canvas, as training cuts it (frames_mask), is the block alone,
    # as sampling sees it: the frames after it change nothing.
    block = np.asarray(apply({"params": params}, x[:, :8], *args[1:], prefix_latent=prefix, start_pos=4))
    frames_mask = np.arange(12)[None, :] < np.array([[8], [8]])
    for tail in (x[:, 8:], rng.normal(size=x[:, 8:].shape).astype(np.float32)):
        masked = np.asarray(apply({"params": params}, np.concatenate([x[:, :8], tail], axis=1), *args[1:],
                                  prefix_latent=prefix, start_pos=4, frames_mask=frames_mask))
        np.testing.assert_allclose(masked[:, :8], block, atol=1e-5)

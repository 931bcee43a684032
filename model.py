"""Echo DiT: the flow-matching Diffusion Transformer of Echo TTS, in Flax.

The model predicts the flow-matching velocity of a 25 frames/s DACVAE latent
(B, S, 128), conditioned on UTF-8 text bytes and a speaker reference latent.
The contract is `../shared/spec/echo_dit.md`; this file is its readable version.

    model = EchoDiT(PRESETS["1.3B"])
    cond = model.apply(params, text_ids, text_mask, spk, spk_mask, method=EchoDiT.encode_conditions)
    v = model.apply(params, x, t, cond, method=EchoDiT.decode)   # once per sampling step

Self-check (parity with the reference vectors and parameter counts):

    python model.py
"""

import dataclasses
import json
import math
import os
import re
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep the weight matmuls' outputs, recompute attention and elementwise work.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class EchoConfig:
    # Decoder (the DiT over latent frames)
    model_size: int = 1536
    num_layers: int = 24
    num_heads: int = 12
    intermediate_size: int = 4224
    latent_size: int = 128  # DACVAE latent channels
    timestep_embed_size: int = 512
    adaln_rank: int = 256
    norm_eps: float = 1e-5
    # Speaker encoder (patches of `encoder_patch_size` latent frames)
    encoder_model_size: int = 1024
    encoder_num_layers: int = 10
    encoder_num_heads: int = 8
    encoder_intermediate_size: int = 2816
    encoder_patch_size: int = 4
    # The speaker encoder's input projection is scaled by this (Echo's published code: 1/6; the seed's
    # presets: 1). The latent encoder shares it.
    speaker_in_scale: float = 1.0
    # Blockwise generation (Echo's latent-prefix path): a latent encoder (built like the speaker
    # encoder) turns already generated frames into a fourth key/value source of every decoder block.
    blockwise: bool = False
    # Text encoder (UTF-8 bytes)
    text_vocab_size: int = 256
    text_model_size: int = 1024
    text_num_layers: int = 10
    text_num_heads: int = 8
    text_intermediate_size: int = 2816
    # Execution (not part of the weights)
    dtype: str = "float32"  # compute dtype: float32 or bfloat16; params stay float32
    remat: str = "none"  # none | full | save_dots
    scan_layers: bool = True  # stack identical layers with nn.scan: compile time independent of depth
    # Unroll the scanned layers in the compiled program (same stacked parameters). A multi-process
    # CPU run needs it: XLA:CPU does not order the collectives inside a loop against those outside
    # it, and the hosts then call gloo in different orders (README, "Training on a TPU pod").
    unroll_scan: bool = False

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        for width, heads, what in ((self.model_size, self.num_heads, "decoder"),
                                   (self.encoder_model_size, self.encoder_num_heads, "speaker encoder"),
                                   (self.text_model_size, self.text_num_heads, "text encoder")):
            if width % heads or (width // heads) % 2:
                raise ValueError(f"{what}: width {width} must split into {heads} heads of even size")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_reference(cls, d: dict) -> "EchoConfig":
        """Config from the reference code's field names (e.g. a test vectors' config.json)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and k not in ("remat", "dtype")}
        if "dtype" in d:
            kwargs["dtype"] = str(d["dtype"])
        if "remat" in d:  # the reference stores a bool
            kwargs["remat"] = d["remat"] if isinstance(d["remat"], str) else ("full" if d["remat"] else "none")
        return cls(**kwargs)

    @classmethod
    def from_echo_torch(cls, kwargs: dict) -> "EchoConfig":
        """The config of Echo's published PyTorch model (echo_tts.model.EchoDiT), from its constructor's
        arguments: its speaker encoder scales its input projection by 1/6, and it has the latent-prefix
        path."""
        renamed = {f"speaker_{name}": f"encoder_{name}"
                   for name in ("patch_size", "model_size", "num_layers", "num_heads", "intermediate_size")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in kwargs if renamed.get(k, k) not in known)
        if unknown:
            raise ValueError(f"not arguments of Echo's published EchoDiT: {', '.join(unknown)}")
        return cls(**{renamed.get(k, k): v for k, v in kwargs.items()}, speaker_in_scale=1 / 6, blockwise=True)


PRESETS = {
    "1.3B": EchoConfig(),
    "840M": EchoConfig(model_size=1280, num_heads=10, intermediate_size=3520,
                       encoder_model_size=768, encoder_num_layers=8, encoder_num_heads=6,
                       encoder_intermediate_size=2112, text_model_size=768, text_num_layers=8,
                       text_num_heads=6, text_intermediate_size=2112),
    # The embedded demo (train_pretrain.py --data synthetic): wide and deep enough to learn text
    # alignment within minutes on a 2-core CPU. Its few layers are unrolled: on XLA:CPU that compiles
    # as fast as the scan and trains about 15% faster per step (README, "The demo").
    "demo": EchoConfig(model_size=128, num_layers=4, num_heads=4, intermediate_size=352,
                       timestep_embed_size=64, adaln_rank=32,
                       encoder_model_size=64, encoder_num_layers=1, encoder_num_heads=2,
                       encoder_intermediate_size=176, text_model_size=96, text_num_layers=3,
                       text_num_heads=3, text_intermediate_size=264, scan_layers=False),
    # The reference test vectors' size: a CPU train step in a fraction of a second.
    "tiny": EchoConfig(model_size=64, num_layers=2, num_heads=4, intermediate_size=176,
                       timestep_embed_size=32, adaln_rank=16,
                       encoder_model_size=48, encoder_num_layers=2, encoder_num_heads=2,
                       encoder_intermediate_size=132, text_model_size=48, text_num_layers=2,
                       text_num_heads=2, text_intermediate_size=132),
}
PRESETS.update({f"{name}-blockwise": dataclasses.replace(config, blockwise=True)
                for name, config in list(PRESETS.items())})

# ----------------------------------------------------------------------------
# Sharding: every parameter carries logical axis names; these rules map them to
# the mesh. FSDP shards the model width of every large weight over `fsdp`.

def logical_axis_rules(tensor_parallel: bool = False):
    """Logical axis -> mesh axis. Mesh axes: data, fsdp (and tensor, if tensor_parallel)."""
    tp = "tensor" if tensor_parallel else None
    return (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("heads", tp),
        ("mlp", tp),
        ("act_heads", tp),
        ("act_mlp", tp),
        ("layers", None),
        ("length", None),
        ("act_embed", None),
        ("vocab", None),
        ("latent", None),
        ("rank", None),
        ("cond", None),
        ("norm", None),
        ("head_dim", None),
    )


KERNEL_INIT = nn.initializers.truncated_normal(0.02)
MASK_BIAS = -1e9  # added to the logits of masked keys


@jax.custom_vjp
def matmul(x, kernel):
    """x (..., in) @ kernel (in, out), with a backward pass that XLA:CPU runs at full speed."""
    return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
    x, kernel = residuals
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    bwd = lambda t, x2, kernel, dy2: (dy2 @ kernel.T, t(x2) @ dy2)
    dx, dkernel = _on_cpu_canonical(bwd, x2, kernel, dy2)
    return dx.reshape(x.shape), dkernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Module):
    """nn.Dense's parameters and maths (kernel (in, out), optional bias), through `matmul`."""
    features: int
    axes: tuple  # logical names of the kernel's (in, out) axes
    use_bias: bool = False
    zero_init: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.zero_init else KERNEL_INIT
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def dense(features, axes, *, use_bias=False, zero_init=False, dtype=jnp.float32, name=None):
    return Dense(features, tuple(axes), use_bias, zero_init, dtype, name=name)


def rms_norm(x, eps, weight=None):
    """RMSNorm in float32, cast back to the input dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
    shape: tuple
    axes: tuple
    eps: float

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, self.axes),
                            self.shape, jnp.float32)
        return rms_norm(x, self.eps, weight)


def rope(x, positions=None, theta=10000.0):
    """Rotate adjacent channel pairs (2i, 2i+1) by pos / theta^(2i/hd). x: (B, S, H, hd); positions:
    (S,) or (B, S), default 0..S-1."""
    _, s, _, hd = x.shape
    freqs = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)  # (hd/2,)
    positions = np.arange(s) if positions is None else positions
    # Known positions (numpy) stay constants of the program; only per-row start positions are traced.
    xp = np if isinstance(positions, np.ndarray) else jnp
    angles = positions.astype(xp.float32)[..., None] * freqs  # (S, hd/2) or (B, S, hd/2)
    angles = angles[None] if angles.ndim == 2 else angles
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], hd // 2, 2)
    re_, im = x32[..., 0], x32[..., 1]
    out = jnp.stack([re_ * cos - im * sin, re_ * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _swap_last(a):
    return jnp.swapaxes(a, -1, -2)


def _on_cpu_canonical(fn_of_transpose, *args):
    """fn(transpose, *args), where on XLA:CPU `transpose` materialises the swap of the last two axes.

    XLA:CPU's (batched) matmuls run at full speed only when the lhs contracts its last axis and the
    rhs its first non-batch axis; otherwise it fuses the transposes into strided loops and a
    backward pass costs 5x its forward. Elsewhere (TPU) the compiler picks layouts itself.
    """
    materialised = lambda a: jax.lax.optimization_barrier(_swap_last(a))
    return jax.lax.platform_dependent(*args, cpu=lambda *a: fn_of_transpose(materialised, *a),
                                      default=lambda *a: fn_of_transpose(_swap_last, *a))


@jax.custom_vjp
def _attention_core(q, k, v, bias):
    return _attention_core_fwd(q, k, v, bias)[0]


def _attention_core_fwd(q, k, v, bias):
    """q (B,H,Sq,hd) pre-scaled, k/v (B,H,Sk,hd), bias float32 broadcastable to (B,H,Sq,Sk)."""
    def fwd(t, q, k, v, bias):
        logits = jnp.matmul(q, t(k), preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.matmul(probs.astype(v.dtype), v), probs
    out, probs = _on_cpu_canonical(fwd, q, k, v, bias)
    return out, (q, k, v, bias, probs)


def _attention_core_bwd(residuals, dout):
    q, k, v, bias, probs = residuals

    def bwd(t, q, k, v, probs, dout):
        p = probs.astype(v.dtype)
        dp = jnp.matmul(dout, t(v), preferred_element_type=jnp.float32)
        dv = jnp.matmul(t(p), dout)
        ds = probs * (dp - jnp.sum(dp * probs, axis=-1, keepdims=True))  # softmax backward, float32
        dlogits = ds.astype(q.dtype)
        return jnp.matmul(dlogits, k), jnp.matmul(t(dlogits), q), dv, ds

    dq, dk, dv, ds = _on_cpu_canonical(bwd, q, k, v, probs, dout)
    broadcast_axes = tuple(i for i, n in enumerate(bias.shape) if n == 1)
    return dq, dk, dv, jnp.sum(ds, axis=broadcast_axes, keepdims=True).astype(bias.dtype)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def attention(q, k, v, key_mask=None, causal=False):
    """Softmax attention, logits and softmax in float32. q (B,Sq,H,hd), k/v (B,Sk,H,hd), key_mask (B,Sk)."""
    sq, sk = q.shape[1], k.shape[1]
    # Masks enter as an additive bias; its finite fill keeps rows with no valid key (CFG
    # dropout) finite instead of NaN.
    bias = jnp.zeros((1, 1, 1, sk), jnp.float32)
    if key_mask is not None:
        bias = bias + jnp.where(key_mask.astype(bool), 0.0, MASK_BIAS)[:, None, None, :]
    if causal:
        bias = bias + jnp.where(jnp.tril(jnp.ones((sq, sk), bool)), 0.0, MASK_BIAS)
    heads_first = lambda a: jnp.transpose(a, (0, 2, 1, 3))  # (B, H, S, hd)
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    out = _attention_core(heads_first(q), heads_first(k), heads_first(v), bias)
    return heads_first(out)  # (B, Sq, H, hd)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""
    width: int
    hidden: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        gate = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="w1")(x)
        up = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="w3")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="w2")(h)


def split_heads(x, num_heads):
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def rope_half(x, positions):
    """Echo's decoder RoPE: positions on the first H/2 heads only. x: (B, S, H, hd)."""
    h = x.shape[2]
    return jnp.concatenate([rope(x[:, :, :h // 2], positions), x[:, :, h // 2:]], axis=2)


class SelfAttention(nn.Module):
    """Gated self-attention of the encoders: QK-norm, RoPE on every head."""
    width: int
    num_heads: int
    causal: bool
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x, key_mask):
        h, hd = self.num_heads, self.width // self.num_heads
        proj = lambda name: split_heads(dense(self.width, ("embed", "heads"), dtype=self.dtype, name=name)(x), h)
        q, k, v, gate = proj("wq"), proj("wk"), proj("wv"), proj("wgate")  # (B, S, H, hd)
        q = RMSNorm((h, hd), ("norm", "head_dim"), self.eps, name="q_norm")(q)
        k = RMSNorm((h, hd), ("norm", "head_dim"), self.eps, name="k_norm")(k)
        out = attention(rope(q), rope(k), v, key_mask, causal=self.causal)
        out = (out * nn.sigmoid(gate)).reshape(x.shape[:-1] + (self.width,))
        return dense(self.width, ("heads", "embed"), dtype=self.dtype, name="wo")(out)


class EncoderBlock(nn.Module):
    """Pre-norm block of the text and speaker encoders; scan-compatible (carry, _) -> (carry, None)."""
    width: int
    num_heads: int
    hidden: int
    causal: bool
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x, key_mask):
        norm = lambda name: RMSNorm((self.width,), ("norm",), self.eps, name=name)
        x = x + SelfAttention(self.width, self.num_heads, self.causal, self.eps, self.dtype,
                              name="attention")(norm("attention_norm")(x), key_mask)
        x = x + MLP(self.width, self.hidden, self.dtype, name="mlp")(norm("mlp_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), None


def scan_unroll(config: EchoConfig, length: int) -> int:
    """nn.scan's `unroll`: the whole scan with config.unroll_scan (no loop left in the program), else 1."""
    return length if config.unroll_scan else 1


def remat_block(block_cls, config: EchoConfig):
    policy = REMAT_POLICIES[config.remat]
    if config.remat == "none":
        return block_cls
    return nn.remat(block_cls, policy=policy, prevent_cse=not config.scan_layers or config.unroll_scan)


def encoder_stack(config: EchoConfig, x, key_mask, width, num_heads, hidden, causal, num_layers, name):
    """`num_layers` EncoderBlocks, scanned or unrolled (then named `{name}_{i}` as in the reference)."""
    block_cls = remat_block(EncoderBlock, config)
    args = (width, num_heads, hidden, causal, config.norm_eps, config.compute_dtype)
    if config.scan_layers:
        scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=nn.broadcast, length=num_layers, unroll=scan_unroll(config, num_layers),
                          metadata_params={nn.PARTITION_NAME: "layers"})
        return scanned(*args, name="layers")(x, key_mask)[0]
    for i in range(num_layers):
        x, _ = block_cls(*args, name=f"{name}_{i}")(x, key_mask)
    return x


class TextEncoder(nn.Module):
    config: EchoConfig

    @nn.compact
    def __call__(self, text_ids, text_mask):
        c = self.config
        x = nn.Embed(c.text_vocab_size, c.text_model_size, dtype=c.compute_dtype, param_dtype=jnp.float32,
                     embedding_init=nn.with_logical_partitioning(KERNEL_INIT, ("vocab", "embed")),
                     name="text_embedding")(text_ids)  # (B, St, dt)
        return encoder_stack(c, x, text_mask, c.text_model_size, c.text_num_heads, c.text_intermediate_size,
                             False, c.text_num_layers, "TextTransformerBlock")


class SpeakerEncoder(nn.Module):
    """Causal encoder over patches of latent frames: the speaker reference, and (a second instance)
    the prefix of blockwise generation."""
    config: EchoConfig

    @nn.compact
    def __call__(self, speaker_latent):
        c = self.config
        b, s, d = speaker_latent.shape
        p = c.encoder_patch_size
        x = speaker_latent.reshape(b, s // p, p * d).astype(c.compute_dtype)  # frame-major patches
        x = dense(c.encoder_model_size, ("latent", "embed"), use_bias=True, dtype=c.compute_dtype,
                  name="in_proj")(x)  # (B, Ss/p, ds)
        if c.speaker_in_scale != 1.0:
            x = x * jnp.asarray(c.speaker_in_scale, x.dtype)
        return encoder_stack(c, x, None, c.encoder_model_size, c.encoder_num_heads,
                             c.encoder_intermediate_size, True, c.encoder_num_layers, "EncoderTransformerBlock")


def timestep_embedding(t, size):
    """Sinusoidal embedding [cos(t f), sin(t f)], f = 1000 * 10000^(-i/half)."""
    half = size // 2
    freqs = 1000.0 * jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class LowRankAdaLN(nn.Module):
    """Per-block modulation: v = g_v + up(down(silu(g_v))) for shift, scale, gate (float32)."""
    config: EchoConfig

    @nn.compact
    def __call__(self, x, global_mods):
        c = self.config
        shift, scale, gate = (
            g + dense(c.model_size, ("rank", "embed"), use_bias=True, zero_init=True, name=name)(
                dense(c.adaln_rank, ("embed", "rank"), name=f"adaln_rank_{name}")(nn.silu(g)))
            for name, g in zip(("shift", "scale", "gate"), global_mods))
        h = rms_norm(x.astype(jnp.float32), c.norm_eps) * (1 + scale[:, None]) + shift[:, None]
        return h.astype(x.dtype), jnp.tanh(gate)[:, None]


class JointAttention(nn.Module):
    """Queries from the latent frames; keys/values from frames, text and speaker together (and, in a
    blockwise model, the prefix)."""
    config: EchoConfig

    def setup(self):
        c = self.config
        h, hd = c.num_heads, c.model_size // c.num_heads
        proj = lambda: dense(c.model_size, ("embed", "heads"), dtype=c.compute_dtype)
        self.wq, self.wk_self, self.wv_self, self.wgate = proj(), proj(), proj(), proj()
        self.wk_text, self.wv_text, self.wk_speaker, self.wv_speaker = proj(), proj(), proj(), proj()
        if c.blockwise:
            self.wk_latent, self.wv_latent = proj(), proj()
        self.wo = dense(c.model_size, ("heads", "embed"), dtype=c.compute_dtype)
        self.q_norm = RMSNorm((h, hd), ("norm", "head_dim"), c.norm_eps)
        self.k_norm = RMSNorm((h, hd), ("norm", "head_dim"), c.norm_eps)

    def condition_kv(self, text_state, speaker_state):
        """Keys/values of text and speaker: depend only on the conditions, so a sampler computes them once."""
        h = self.config.num_heads
        k = jnp.concatenate([split_heads(self.wk_text(text_state), h),
                             split_heads(self.wk_speaker(speaker_state), h)], axis=1)
        v = jnp.concatenate([split_heads(self.wv_text(text_state), h),
                             split_heads(self.wv_speaker(speaker_state), h)], axis=1)
        return self.k_norm(k), v  # (B, St + Ss/p, H, hd)

    def prefix_kv(self, prefix_state):
        """Keys/values of the prefix's patches, each key rotated to its first frame's position."""
        h = self.config.num_heads
        k = self.k_norm(split_heads(self.wk_latent(prefix_state), h))
        positions = np.arange(prefix_state.shape[1]) * self.config.encoder_patch_size
        return rope_half(k, positions), split_heads(self.wv_latent(prefix_state), h)

    def __call__(self, x, cond_k, cond_v, cond_mask, positions, frames_mask=None):
        c = self.config
        h = c.num_heads
        q = rope_half(self.q_norm(split_heads(self.wq(x), h)), positions)
        k = rope_half(self.k_norm(split_heads(self.wk_self(x), h)), positions)
        v = split_heads(self.wv_self(x), h)
        k = jnp.concatenate([k, cond_k.astype(k.dtype)], axis=1)
        v = jnp.concatenate([v, cond_v.astype(v.dtype)], axis=1)
        frames_mask = jnp.ones(x.shape[:2], bool) if frames_mask is None else frames_mask.astype(bool)
        key_mask = jnp.concatenate([frames_mask, cond_mask.astype(bool)], axis=1)
        out = attention(q, k, v, key_mask)
        out = out * nn.sigmoid(split_heads(self.wgate(x), h))
        return self.wo(out.reshape(x.shape[:-1] + (c.model_size,)))


class DecoderBlock(nn.Module):
    """x += g * JointAttention(AdaLN(x)); x += g * MLP(AdaLN(x)). Scan-compatible."""
    config: EchoConfig

    def setup(self):
        c = self.config
        self.attention = JointAttention(c)
        self.attn_adaln = LowRankAdaLN(c)
        self.mlp = MLP(c.model_size, c.intermediate_size, c.compute_dtype)
        self.mlp_adaln = LowRankAdaLN(c)

    def condition_kv(self, text_state, speaker_state):
        return self.attention.condition_kv(text_state, speaker_state)

    def prefix_kv(self, prefix_state):
        return self.attention.prefix_kv(prefix_state)

    def __call__(self, x, layer_kv, cond_mask, global_mods, positions, frames_mask=None):
        h, g = self.attn_adaln(x, global_mods)
        x = x + (g * self.attention(h, *layer_kv, cond_mask, positions, frames_mask)).astype(x.dtype)
        h, g = self.mlp_adaln(x, global_mods)
        x = x + (g * self.mlp(h)).astype(x.dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), None


class EchoDiT(nn.Module):
    """Velocity v(x_t, t | text, speaker), float32 output of shape x.shape."""
    config: EchoConfig

    def setup(self):
        c = self.config
        self.text_encoder = TextEncoder(c)
        self.text_norm = RMSNorm((c.text_model_size,), ("norm",), c.norm_eps)
        self.speaker_encoder = SpeakerEncoder(c)
        self.speaker_norm = RMSNorm((c.encoder_model_size,), ("norm",), c.norm_eps)
        if c.blockwise:
            self.latent_encoder = SpeakerEncoder(c)
            self.latent_norm = RMSNorm((c.encoder_model_size,), ("norm",), c.norm_eps)
        self.cond_dense_0 = dense(c.model_size, ("latent", "embed"))
        self.cond_dense_1 = dense(c.model_size, ("embed", "cond"))
        self.cond_dense_global_shift = dense(c.model_size, ("embed", "cond"))
        self.cond_dense_global_scale = dense(c.model_size, ("embed", "cond"))
        self.cond_dense_global_gate = dense(c.model_size, ("embed", "cond"))
        self.in_proj = dense(c.model_size, ("latent", "embed"), use_bias=True, dtype=c.compute_dtype)
        block_cls = remat_block(DecoderBlock, c)
        if c.scan_layers:
            self.layers = block_cls(c)
        else:
            self.blocks = [block_cls(c) for _ in range(c.num_layers)]
        self.norm = RMSNorm((c.model_size,), ("norm",), c.norm_eps)
        self.out_proj = dense(c.latent_size, ("embed", "latent"), use_bias=True, zero_init=True,
                              dtype=c.compute_dtype)

    def __call__(self, x, t, text_ids, text_mask, speaker_latent, speaker_mask, prefix_latent=None, start_pos=0,
                 frames_mask=None):
        cond = self.encode_conditions(text_ids, text_mask, speaker_latent, speaker_mask)
        if self.config.blockwise and (prefix_latent is not None or self.is_initializing()):
            prefix = jnp.zeros_like(speaker_latent) if prefix_latent is None else prefix_latent
            cond = with_prefix(cond, self.encode_prefix(prefix), start_pos, self.config.encoder_patch_size)
        elif prefix_latent is not None:
            raise ValueError("this model has no latent-prefix path (EchoConfig.blockwise)")
        return self.decode(x, t, cond, start_pos, frames_mask)

    def encode_conditions(self, text_ids, text_mask, speaker_latent, speaker_mask):
        """Text and speaker states -> per-layer keys/values. Run once per utterance, reuse every step.

        Returns {"k", "v": (L, B, St + Ss/p, H, hd), "mask": (B, St + Ss/p) bool}. Zeroing part of
        "mask" is exactly CFG dropout of that condition, so guidance passes can share k and v.
        """
        c = self.config
        text_state = self.text_norm(self.text_encoder(text_ids, text_mask))
        speaker_state = self.speaker_norm(self.speaker_encoder(speaker_latent))
        mask = jnp.concatenate([text_mask.astype(bool),
                                speaker_mask[:, ::c.encoder_patch_size].astype(bool)], axis=1)
        k, v = self.per_layer_kv(lambda block: block.condition_kv(text_state, speaker_state))
        return {"k": k, "v": v, "mask": mask}

    def per_layer_kv(self, kv_of_block):
        """Every decoder block's (k, v) = kv_of_block(block), stacked: (L, B, S, H, hd) each."""
        c = self.config
        if c.scan_layers:
            scan = nn.scan(lambda block, carry, _: (carry, kv_of_block(block)), variable_axes={"params": 0},
                           split_rngs={"params": True}, length=c.num_layers, unroll=scan_unroll(c, c.num_layers),
                           metadata_params={nn.PARTITION_NAME: "layers"})
            _, (k, v) = scan(self.layers, None, None)
            return k, v
        kvs = [kv_of_block(blk) for blk in self.blocks]
        return jnp.stack([kv[0] for kv in kvs]), jnp.stack([kv[1] for kv in kvs])

    def encode_prefix(self, prefix_latent):
        """Already generated (or given) frames -> per-layer keys/values, once per prefix (blockwise
        models). prefix_latent (B, Sp, D), Sp a multiple of the patch size; patch j's keys sit at
        frame position j * patch. Returns {"k", "v": (L, B, Sp/p, H, hd)}; `with_prefix` joins them
        to the conditions."""
        state = self.latent_norm(self.latent_encoder(prefix_latent))
        k, v = self.per_layer_kv(lambda block: block.prefix_kv(state))
        return {"k": k, "v": v}

    def decode(self, x, t, cond, start_pos=0, frames_mask=None):
        """One velocity evaluation given precomputed conditions. x (B, S, D), t (B,) in [0, 1];
        start_pos (an int, or (B,)): the frame position of x's first frame (blockwise generation);
        frames_mask (B, S): the frames of x that the others attend (None: all; blockwise training
        hides the places after a block that ends inside the canvas, as they do not exist when sampling)."""
        c = self.config
        emb = timestep_embedding(t, c.timestep_embed_size)
        cvec = self.cond_dense_1(nn.silu(self.cond_dense_0(emb)))
        s = nn.silu(cvec)
        global_mods = (self.cond_dense_global_shift(s), self.cond_dense_global_scale(s),
                       self.cond_dense_global_gate(s))
        h = self.in_proj(x.astype(c.compute_dtype))
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        positions = start_pos + np.arange(x.shape[1]) if isinstance(start_pos, (int, np.integer)) else \
            jnp.reshape(start_pos, (-1, 1)) + jnp.arange(x.shape[1])  # (S,), or (B, S) for per-row starts
        if c.scan_layers:
            body = lambda block, carry, kv: block(carry, kv, cond["mask"], global_mods, positions, frames_mask)
            scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.num_layers,
                           unroll=scan_unroll(c, c.num_layers), metadata_params={nn.PARTITION_NAME: "layers"})
            h, _ = scan(self.layers, h, (cond["k"], cond["v"]))
        else:
            for i, blk in enumerate(self.blocks):
                h, _ = blk(h, (cond["k"][i], cond["v"][i]), cond["mask"], global_mods, positions, frames_mask)
        return self.out_proj(self.norm(h)).astype(jnp.float32)


def with_prefix(cond, prefix, start_pos, patch_size, prefix_mask=None):
    """The conditions with a prefix's keys/values (EchoDiT.encode_prefix) as one more source: patch j
    is attended where j * patch_size < start_pos (an int, or (B,)) and prefix_mask (B, Sp/p) allows
    it (a shorter prefix in a batch, or CFG dropout of the prefix)."""
    count = prefix["k"].shape[2]
    batch = cond["mask"].shape[0]
    visible = jnp.arange(count) * patch_size < jnp.reshape(jnp.asarray(start_pos), (-1, 1))
    visible = jnp.broadcast_to(visible, (batch, count))
    if prefix_mask is not None:
        visible = visible & prefix_mask.astype(bool)
    return {"k": jnp.concatenate([cond["k"], prefix["k"].astype(cond["k"].dtype)], axis=2),
            "v": jnp.concatenate([cond["v"], prefix["v"].astype(cond["v"].dtype)], axis=2),
            "mask": jnp.concatenate([cond["mask"], visible], axis=1)}


# ----------------------------------------------------------------------------
# Sizes, FLOPs, parameter layouts

def dummy_inputs(config: EchoConfig, batch=1, latent_len=8, text_len=8, speaker_len=None):
    speaker_len = speaker_len or config.encoder_patch_size * 2
    return (jnp.zeros((batch, latent_len, config.latent_size), jnp.float32), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, text_len), jnp.int32), jnp.ones((batch, text_len), jnp.int32),
            jnp.zeros((batch, speaker_len, config.latent_size), jnp.float32),
            jnp.ones((batch, speaker_len), jnp.int32))


def init_params(config: EchoConfig, rng, inputs=None):
    """Boxed (LogicallyPartitioned) parameters; `nn.unbox` them for plain arrays."""
    return EchoDiT(config).init(rng, *(inputs or dummy_inputs(config)))["params"]


def abstract_params(config: EchoConfig):
    """Parameter shapes (with logical axes) without allocating memory."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def count_params(config: EchoConfig) -> int:
    leaves = jax.tree.leaves(nn.unbox(abstract_params(config)))
    return int(sum(math.prod(x.shape) for x in leaves))


def flops_per_sample(config: EchoConfig, latent_len, text_len, speaker_len, training=True):
    """Model FLOPs (2 per multiply-add) of one sample; training = forward + backward (3x)."""
    c = config
    st, ss = text_len, speaker_len // c.encoder_patch_size
    d, dt, ds = c.model_size, c.text_model_size, c.encoder_model_size

    def encoder_layer(width, hidden, tokens):
        return tokens * (5 * width * width + 3 * width * hidden) * 2 + 4 * tokens * tokens * width

    fwd = c.text_num_layers * encoder_layer(dt, c.text_intermediate_size, st)
    fwd += 2 * ss * c.encoder_patch_size * c.latent_size * ds
    fwd += c.encoder_num_layers * encoder_layer(ds, c.encoder_intermediate_size, ss)
    per_layer = latent_len * (5 * d * d + 3 * d * c.intermediate_size) * 2  # q, k, v, gate, o; SwiGLU
    per_layer += 2 * 2 * (st * dt + ss * ds) * d  # text/speaker keys and values
    per_layer += 4 * latent_len * (latent_len + st + ss) * d  # QK^T and PV
    per_layer += 2 * 3 * 2 * 2 * c.adaln_rank * d  # two low-rank AdaLNs per block
    fwd += c.num_layers * per_layer
    fwd += 2 * latent_len * c.latent_size * d * 2  # in_proj, out_proj
    fwd += 2 * (c.timestep_embed_size * d + 4 * d * d)  # timestep MLP and global modulations
    return 3 * fwd if training else fwd


# The reference code keeps one subtree per layer; we stack them under "layers".
_LAYER_PREFIXES = (  # (reference per-layer prefix, our parent path, layer count field)
    ("TransformerBlock_", "", "num_layers"),
    ("text_encoder/TextTransformerBlock_", "text_encoder/", "text_num_layers"),
    ("speaker_encoder/EncoderTransformerBlock_", "speaker_encoder/", "encoder_num_layers"),
    ("latent_encoder/EncoderTransformerBlock_", "latent_encoder/", "encoder_num_layers"),
)
_HEAD_PROJ = re.compile(r"(/attention/w[a-z_]+)/kernel$")


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def unflatten(flat):
    tree = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _our_layer_path(config: EchoConfig, ref_prefix, parent, index, rest):
    if config.scan_layers:
        return f"{parent}layers/{rest}"
    if parent == "":
        return f"blocks_{index}/{rest}"
    return f"{ref_prefix}{index}/{rest}"


def _reference_layout(config: EchoConfig):
    """{reference name: (our name, layer index or None, shape)} for every parameter."""
    ours = flatten(jax.tree.map(lambda x: x.shape, nn.unbox(abstract_params(config)),
                                is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
    ours = {k: tuple(v) for k, v in ours.items()}
    layout = {}
    for ref_prefix, parent, count_field in _LAYER_PREFIXES:
        for i in range(getattr(config, count_field)):
            start = _our_layer_path(config, ref_prefix, parent, i, "")
            for path, shape in ours.items():
                if path.startswith(start):
                    rest = path[len(start):]
                    ref = _HEAD_PROJ.sub(r"\1/Dense_0/kernel", f"{ref_prefix}{i}/{rest}")
                    layout[ref] = (path, i if config.scan_layers else None,
                                   shape[1:] if config.scan_layers else shape)
    claimed = {our for our, _, _ in layout.values()}
    for path, shape in ours.items():
        if path not in claimed:
            layout[path] = (path, None, shape)
    return layout, ours


def import_reference_params(flat: dict, config: EchoConfig):
    """Reference per-layer '/'-joined arrays -> this model's (unboxed) params. Strict."""
    flat = {k.removeprefix("params/"): v for k, v in flat.items()}
    layout, ours = _reference_layout(config)
    missing = sorted(set(layout) - set(flat))
    extra = sorted(set(flat) - set(layout))
    misshaped = sorted(f"{k} {tuple(np.shape(flat[k]))} != {layout[k][2]}"
                       for k in set(layout) & set(flat) if tuple(np.shape(flat[k])) != layout[k][2])
    if missing or extra or misshaped:
        parts = [f"{what}: {', '.join(names)}" for what, names in
                 (("missing", missing), ("unexpected", extra), ("wrong shape", misshaped)) if names]
        raise ValueError("parameters do not fit this EchoConfig; " + "; ".join(parts))
    out = {}
    for ref, (path, index, _) in layout.items():
        arr = np.asarray(flat[ref], np.float32)
        if index is None:
            out[path] = arr
        else:
            out.setdefault(path, np.zeros(ours[path], np.float32))[index] = arr
    return unflatten(out)


def export_reference_params(params, config: EchoConfig) -> dict:
    """This model's params -> the reference per-layer layout (inverse of import_reference_params)."""
    ours = flatten(jax.tree.map(np.asarray, nn.unbox(params)))
    layout, _ = _reference_layout(config)
    return {ref: (ours[path] if index is None else ours[path][index]) for ref, (path, index, _) in layout.items()}


# Echo's published PyTorch model (echo_tts.model.EchoDiT): its state_dict names. Its torch.nn.Linear
# weights are (out, in), our kernels (in, out); its one (3d, d) projection to the global shift, scale
# and gate is our three (d, d) kernels.
_TORCH_LAYERS = re.compile(r"^(?:(text_encoder|speaker_encoder|latent_encoder)/(?:layers|\w+Block_(\d+))"
                           r"|(?:layers|blocks_(\d+)))/(.*)$")
_TORCH_SEGMENTS = {"wgate": "gate", "wk_self": "wk", "wv_self": "wv", "attn_adaln": "attention_adaln",
                   "kernel": "weight", "embedding": "weight", "norm": "out_norm",
                   "cond_dense_0": "cond_module.0", "cond_dense_1": "cond_module.2"}
_GLOBAL_MODS = ("shift", "scale", "gate")


def _echo_torch_layout(config: EchoConfig):
    """{our '/'-joined path: (torch name, with {i} for a stacked layer's index; row block of the
    global modulation or None)}, and our parameter shapes."""
    ours = flatten(jax.tree.map(lambda x: tuple(x.shape), nn.unbox(abstract_params(config)),
                                is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
    layout = {}
    for path in ours:
        m = _TORCH_LAYERS.match(path)
        if m:
            encoder, encoder_index, block_index, rest = m.groups()
            index = encoder_index or block_index or "{i}"
            head = f"{encoder}.blocks.{index}" if encoder else f"blocks.{index}"
        else:
            head, rest = None, path
        segments = rest.split("/")
        renamed = []
        for j, segment in enumerate(segments):
            if segment.startswith("adaln_rank_"):
                segment = segment.removeprefix("adaln_rank_") + "_down"
            elif segment in _GLOBAL_MODS and j and segments[j - 1].endswith("_adaln"):
                segment += "_up"
            renamed.append(_TORCH_SEGMENTS.get(segment, segment))
        name = ".".join(([head] if head else []) + renamed)
        row = None
        if name.startswith("cond_dense_global_"):
            row = _GLOBAL_MODS.index(name.split(".")[0].removeprefix("cond_dense_global_"))
            name = "cond_module.4." + name.split(".")[-1]
        layout[path] = (name, row)
    return layout, ours


def _from_torch_array(path, array, row, width):
    if row is not None:
        array = array[row * width:(row + 1) * width]
    return array.T if path.endswith("/kernel") else array


def params_from_echo_torch(state_dict, config: EchoConfig):
    """Echo's published PyTorch weights (its EchoDiT's state_dict, tensors or arrays) -> this model's
    params for `config` (EchoConfig.from_echo_torch). Strict: every name, every shape."""
    flat = {k: np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v, np.float32)
            for k, v in state_dict.items()}
    layout, ours = _echo_torch_layout(config)
    out, used, wrong = {}, set(), []
    for path, (name, row) in layout.items():
        stacked = "{i}" in name
        names = [name.format(i=i) for i in range(ours[path][0])] if stacked else [name]
        missing = [n for n in names if n not in flat]
        if missing:
            wrong.append(f"missing {', '.join(missing)}")
            continue
        used.update(names)
        arrays = [_from_torch_array(path, flat[n], row, config.model_size) for n in names]
        array = np.stack(arrays) if stacked else arrays[0]
        if array.shape != ours[path]:
            wrong.append(f"{names[0]} {tuple(flat[names[0]].shape)} does not give {path} {ours[path]}")
        out[path] = array
    wrong += [f"unexpected {n}" for n in sorted(set(flat) - used)]
    if wrong:
        raise ValueError("the PyTorch weights do not fit this EchoConfig: " + "; ".join(wrong[:8]))
    return unflatten(out)


def params_to_echo_torch(params, config: EchoConfig) -> dict:
    """This model's params -> the state_dict names and layouts of Echo's published PyTorch model (numpy
    arrays; `torch.from_numpy` each for `load_state_dict`). Inverse of params_from_echo_torch."""
    flat = flatten(jax.tree.map(lambda x: np.asarray(x, np.float32), nn.unbox(params)))
    layout, ours = _echo_torch_layout(config)
    out, global_rows = {}, {}
    for path, (name, row) in layout.items():
        array = flat[path].swapaxes(-1, -2) if path.endswith("/kernel") else flat[path]
        if row is not None:
            global_rows.setdefault(name, {})[row] = array
        elif "{i}" in name:
            out.update({name.format(i=i): array[i] for i in range(array.shape[0])})
        else:
            out[name] = array
    out.update({name: np.concatenate([rows[j] for j in range(len(_GLOBAL_MODS))])
                for name, rows in global_rows.items()})
    return out


# ----------------------------------------------------------------------------
# Self-check

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    data = os.path.join(here, "tests", "data", "echo_dit_tiny")
    for name in ("1.3B", "840M"):
        print(f"{name}: {count_params(PRESETS[name]):,} parameters")
    with open(os.path.join(data, "config.json")) as f:
        config = EchoConfig.from_reference(json.load(f))
    params = import_reference_params(dict(np.load(os.path.join(data, "params.npz"))), config)
    inputs = np.load(os.path.join(data, "inputs.npz"))
    out = EchoDiT(config).apply({"params": params}, inputs["x"], inputs["t"], inputs["text_input_ids"],
                                inputs["text_mask"], inputs["speaker_latent"], inputs["speaker_mask"])
    diff = float(np.max(np.abs(np.asarray(out) - np.load(os.path.join(data, "expected.npz"))["out"])))
    print(f"parity with the reference vectors: max abs diff {diff:.2e} ({'ok' if diff < 1e-4 else 'FAIL'})")
    sys.exit(0 if diff < 1e-4 else 1)


if __name__ == "__main__":
    main()

"""DACVAE, Meta's 48 kHz audio codec, in plain PyTorch: loads the official `weights.pth`.

The latent Echo trains on is the encoder's posterior MEAN: (B, 128, frames) at 25 frames/s.
The contract is `../shared/spec/dacvae.md`. No code from a weights file ever runs
(`torch.load(weights_only=True)`), and the model is built from the file's own kwargs.

    python dacvae.py encode speech.flac speech.npy          # (frames, 128) float16, the shard format
    python dacvae.py decode speech.npy speech.wav
    python dacvae.py silence silence_latent.npy --seconds 30
    python dacvae.py init-random random.pth --size tiny     # random weights, official file layout

`--weights` takes a local file or a Hub repo id (default: $DACVAE_WEIGHTS, else
facebook/dacvae-watermarked).
"""

import argparse
import math
import os
import sys

import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import logging as hf_logging
from torch import nn
from tqdm import tqdm

import storage

DEFAULT_WEIGHTS = "facebook/dacvae-watermarked"
SAMPLE_RATE = 48000
MESSAGE_BITS = 16
WATERMARK_RATES = (8, 5, 4, 2)
WATERMARK_LATENT = 128  # width of the watermark message space
WATERMARK_ALPHA = 32 / 128  # the official blend: wm_channels / d_wm_out, fixed at release size
CHUNK_FRAMES = 250  # 10 s of audio per chunk on long inputs
OVERLAP_FRAMES = 8  # per side; above the codec's receptive field

RELEASED_KWARGS = dict(encoder_dim=64, encoder_rates=[2, 8, 10, 12], latent_dim=1024, decoder_dim=1536,
                       decoder_rates=[12, 10, 8, 2], n_codebooks=16, codebook_size=1024, codebook_dim=128,
                       quantizer_dropout=False, sample_rate=48000)
TINY_KWARGS = dict(RELEASED_KWARGS, encoder_dim=2, latent_dim=16, decoder_dim=96)


SILENT_PEAK = 1e-4  # a clip whose peak stays below this (-80 dBFS) is digital silence


class DACVAEError(Exception):
    """A problem the user can fix (bad file, unreachable Hub); main() prints it as one sentence."""


# ----------------------------------------------------------------------------
# Layers. Parameter names follow the official state dict exactly.

def snake(x, alpha):
    """x + sin(alpha x)^2 / (alpha + 1e-9), per channel, float32."""
    if torch.is_grad_enabled():
        return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)
    # Inference: one temporary instead of five; these tensors are the codec's largest.
    y = torch.mul(x, alpha).sin_().square_()
    return y.mul_((alpha + 1e-9).reciprocal()).add_(x)


class Snake(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        return snake(x, self.alpha)


class _Weighted(nn.Module):
    """A conv weight of `shape`, weight-normalised over all axes but the first (weight_g,
    weight_v: w = g v / ||v||, as torch's old weight_norm stored it) or plain (weight); plus a bias."""

    def __init__(self, shape, bias_size, weight_norm):
        super().__init__()
        self.weight_norm = weight_norm
        if weight_norm:
            self.weight_v = nn.Parameter(torch.empty(shape))
            self.weight_g = nn.Parameter(torch.empty(shape[0], 1, 1))
        else:
            self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(bias_size))

    def get_weight(self):
        if not self.weight_norm:
            return self.weight
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=(1, 2), keepdim=True)


class Conv(_Weighted):
    """Conv1d, weight-normalised or plain.

    `causal=False`: symmetric padding (kernel - stride) * dilation // 2 (the official "none" mode).
    `causal=True`: all padding on the left, plus what the last stride needs on the right ("auto").
    """

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, weight_norm=True, causal=False):
        super().__init__((cout, cin, kernel), cout, weight_norm)
        self.kernel, self.stride, self.dilation, self.causal = kernel, stride, dilation, causal

    def forward(self, x):
        if self.causal:
            effective = (self.kernel - 1) * self.dilation + 1
            total = effective - self.stride
            frames = math.ceil((x.shape[-1] - effective + total) / self.stride + 1)
            extra = (frames - 1) * self.stride + (self.kernel - total) - x.shape[-1]
            return F.conv1d(F.pad(x, (total, extra)), self.get_weight(), self.bias, self.stride, 0, self.dilation)
        padding = (self.kernel - self.stride) * self.dilation // 2
        return F.conv1d(x, self.get_weight(), self.bias, self.stride, padding, self.dilation)


class ConvTranspose(_Weighted):
    """ConvTranspose1d with kernel 2 * stride: output length = input length * stride."""

    def __init__(self, cin, cout, stride, weight_norm=True, causal=False):
        super().__init__((cin, cout, 2 * stride), cout, weight_norm)
        self.stride, self.causal = stride, causal

    def forward(self, x):
        w = self.get_weight()
        b, cin, t = x.shape
        cout, s = w.shape[1], self.stride
        # With kernel 2s, each input step writes two length-s blocks: one matmul, then an
        # overlap-add. torch's own conv_transpose1d takes a slow path on CPU (3x slower).
        z = torch.matmul(w.reshape(cin, cout * 2 * s).T, x).view(b, cout, 2, s, t)
        full = x.new_empty(b, cout, t + 1, s)  # output step k * s + j lives at [k, j]
        full[:, :, t] = self.bias[:, None]
        torch.add(z[:, :, 0].transpose(-1, -2), self.bias[:, None, None], out=full[:, :, :t])
        full[:, :, 1:] += z[:, :, 1].transpose(-1, -2)
        start = 0 if self.causal else (s + 1) // 2  # the official paddings: causal crop, or "same"
        return full.view(b, cout, (t + 1) * s)[..., start:start + t * s]


class ResidualUnit(nn.Module):
    """Main path: Snake, conv k7 dilated, Snake, conv k1. Watermark path: ELU, causal conv k3 to
    half width, ELU, conv k1 back (plain convs)."""

    def __init__(self, dim, dilation=1, watermark=False):
        super().__init__()
        if watermark:
            self.block = nn.Sequential(nn.ELU(), Conv(dim, dim // 2, 3, weight_norm=False, causal=True),
                                       nn.ELU(), Conv(dim // 2, dim, 1, weight_norm=False, causal=True))
        else:
            self.block = nn.Sequential(Snake(dim), Conv(dim, dim, 7, dilation=dilation),
                                       Snake(dim), Conv(dim, dim, 1))

    def forward(self, x):
        y = self.block(x)
        return y.add_(x) if not torch.is_grad_enabled() else y + x


class EncoderBlock(nn.Module):
    def __init__(self, dim, stride):
        super().__init__()
        self.block = nn.Sequential(ResidualUnit(dim // 2, 1), ResidualUnit(dim // 2, 3), ResidualUnit(dim // 2, 9),
                                   Snake(dim // 2), Conv(dim // 2, dim, 2 * stride, stride=stride))

    def forward(self, x):
        return self.block(x)


class Encoder(nn.Module):
    def __init__(self, dim, rates, latent_dim):
        super().__init__()
        layers = [Conv(1, dim, 7)]
        for stride in rates:
            dim *= 2
            layers.append(EncoderBlock(dim, stride))
        layers += [Snake(dim), Conv(dim, latent_dim, 3)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return self.block(x)


class DecoderBlock(nn.Module):
    """One upsampling block: a main path and, interleaved in the official layer list, the two
    halves of the watermark branch at a third of the width."""

    def __init__(self, cin, cout, stride, wm_stride):
        super().__init__()
        wm_in, wm_out = cin // 3, cout // 3
        self.block = nn.ModuleList([
            Snake(cin), ConvTranspose(cin, cout, stride),  # 0, 1: main upsampling
            nn.ELU(), ConvTranspose(wm_in, wm_out, wm_stride, weight_norm=False, causal=True),  # 2, 3
            ResidualUnit(cout, 1), ResidualUnit(cout, 3),  # 4, 5: main
            ResidualUnit(wm_out, watermark=True), ResidualUnit(wm_out, watermark=True),  # 6, 7
            ResidualUnit(cout, 9), nn.Identity(),  # 8, 9: main
            nn.ELU(), Conv(wm_out, wm_in, 2 * wm_stride, stride=wm_stride, weight_norm=False, causal=True),  # 10, 11
        ])

    def forward(self, x):
        for i in (0, 1, 4, 5, 8):
            x = self.block[i](x)
        return x

    def watermark_down(self, h):
        """Towards the message: residual, ELU, strided conv (time / wm_stride, width x3/2)."""
        for i in (7, 10, 11):
            h = self.block[i](h)
        return h

    def watermark_up(self, h):
        """Back to audio rate: ELU, transposed conv, residual."""
        for i in (2, 3, 6):
            h = self.block[i](h)
        return h


class LSTMBlock(nn.Module):
    def __init__(self, hidden, layers):
        super().__init__()
        self.lstm = nn.LSTM(hidden, hidden, layers)

    def forward(self, x):  # (B, C, T)
        x = x.permute(2, 0, 1)
        y, _ = self.lstm(x)
        return (y + x).permute(1, 2, 0)


class MsgProcessor(nn.Module):
    def __init__(self, nbits, width):
        super().__init__()
        self.msg_processor = nn.Embedding(2 * nbits, width)

    def forward(self, h, message):  # message (B, nbits) of 0/1
        index = 2 * torch.arange(message.shape[-1], device=h.device) + message.long()
        return h + self.msg_processor(index).sum(dim=-2)[..., None]


class WatermarkEncoderBlock(nn.Module):
    def __init__(self, dim, channels, hidden):
        super().__init__()
        self.pre = nn.Sequential(Snake(dim), Conv(dim, 1, 7), nn.Tanh(),
                                 Conv(1, channels, 7, weight_norm=False, causal=True))
        self.post = nn.Sequential(LSTMBlock(hidden, 2), nn.ELU(),
                                  Conv(hidden, WATERMARK_LATENT, 7, weight_norm=False, causal=True))


class WatermarkDecoderBlock(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        self.pre = nn.Sequential(Conv(WATERMARK_LATENT, hidden, 7, weight_norm=False, causal=True),
                                 LSTMBlock(hidden, 2))
        self.post = nn.Sequential(nn.ELU(), Conv(channels, 1, 7, weight_norm=False, causal=True))


class Watermarker(nn.Module):
    def __init__(self, dim, channels, hidden):
        super().__init__()
        self.encoder_block = WatermarkEncoderBlock(dim, channels, hidden)
        self.msg_processor = MsgProcessor(MESSAGE_BITS, WATERMARK_LATENT)
        self.decoder_block = WatermarkDecoderBlock(channels, hidden)


class Decoder(nn.Module):
    def __init__(self, latent_dim, dim, rates):
        super().__init__()
        self.model = nn.ModuleList([Conv(latent_dim, dim, 7)] + [
            DecoderBlock(dim // 2 ** i, dim // 2 ** (i + 1), stride, wm_stride)
            for i, (stride, wm_stride) in enumerate(zip(rates, WATERMARK_RATES))])
        last = dim // 2 ** len(rates)
        # The official code hard-codes 512 and 32 (right for dim 1536); derived here so that
        # smaller test models build too.
        self.wm_model = Watermarker(last, channels=last // 3, hidden=dim // 3)

    def main_and_watermark_front(self, z):
        """Per chunk: main path, output head (Snake, conv, tanh) and the watermark branch down to
        the message rate. Returns (head (B, 1, T), h (B, hidden, T / 320))."""
        x = z
        for layer in self.model:
            x = layer(x)
        pre = self.wm_model.encoder_block.pre
        head = pre[2](pre[1](pre[0](x)))
        h = pre[3](head)
        for block in reversed(self.model[1:]):
            h = block.watermark_down(h)
        return head, h

    def watermark_middle(self, h, message):
        """Whole signal at once (it holds the LSTMs): embed the 16-bit message."""
        h = self.wm_model.encoder_block.post(h)
        h = self.wm_model.msg_processor(h, message)
        return self.wm_model.decoder_block.pre(h)

    def watermark_back(self, h):
        """Per chunk: back up to audio rate, the watermark residual (B, 1, T)."""
        for block in self.model[1:]:
            h = block.watermark_up(h)
        return self.wm_model.decoder_block.post(h)


class VAEBottleneck(nn.Module):
    def __init__(self, latent_dim, codebook_dim):
        super().__init__()
        self.in_proj = Conv(latent_dim, 2 * codebook_dim, 1)
        self.out_proj = Conv(codebook_dim, latent_dim, 1)


def map_chunks(fn, x, in_rate, out_rates, chunk=CHUNK_FRAMES, overlap=OVERLAP_FRAMES, desc=None):
    """Apply a function of finite receptive field over time in chunks of `chunk` frames.

    x has `in_rate` steps per frame; fn returns a tuple of tensors with `out_rates` steps per
    frame. Each chunk sees `overlap` extra frames on each side, which are then dropped.
    """
    frames = x.shape[-1] // in_rate
    starts = range(0, frames, chunk)
    outs = [[] for _ in out_rates]
    for start in tqdm(starts, desc=desc, unit="chunk", leave=False, disable=desc is None or len(starts) < 3):
        end = min(start + chunk, frames)
        lo, hi = max(0, start - overlap), min(frames, end + overlap)
        ys = fn(x[..., lo * in_rate:hi * in_rate])
        for out, y, rate in zip(outs, ys, out_rates):
            out.append(y[..., (start - lo) * rate:(end - lo) * rate])
    return [torch.cat(o, dim=-1) for o in outs]


def reflect_pad_right(x, amount):
    """Reflect padding (torch's 'reflect') that also works when `amount` exceeds the input."""
    n = x.shape[-1]
    if amount == 0:
        return x
    if n == 1:
        return x.expand(*x.shape[:-1], 1 + amount)
    period = 2 * (n - 1)
    index = torch.arange(n, n + amount) % period
    index = torch.where(index >= n, period - index, index)
    return torch.cat([x, x[..., index]], dim=-1)


class DACVAE(nn.Module):
    def __init__(self, encoder_dim=64, encoder_rates=(2, 8, 10, 12), latent_dim=1024, decoder_dim=1536,
                 decoder_rates=(12, 10, 8, 2), codebook_dim=128, sample_rate=SAMPLE_RATE, **unused):
        super().__init__()
        self.kwargs = dict(encoder_dim=encoder_dim, encoder_rates=list(encoder_rates), latent_dim=latent_dim,
                           decoder_dim=decoder_dim, decoder_rates=list(decoder_rates),
                           codebook_dim=codebook_dim, sample_rate=sample_rate, **unused)
        self.hop = math.prod(encoder_rates)
        if math.prod(decoder_rates) != self.hop or self.hop % math.prod(WATERMARK_RATES):
            raise DACVAEError(f"encoder rates {list(encoder_rates)} and decoder rates {list(decoder_rates)} "
                              "do not describe a DACVAE (their products must match and divide by 320)")
        self.sample_rate = sample_rate
        self.codebook_dim = codebook_dim
        self.encoder = Encoder(encoder_dim, encoder_rates, latent_dim)
        self.quantizer = VAEBottleneck(latent_dim, codebook_dim)
        self.decoder = Decoder(latent_dim, decoder_dim, decoder_rates)

    @classmethod
    def load(cls, source=None, flag="--weights"):
        """A local weights.pth, or a Hub repo id (default $DACVAE_WEIGHTS, else the release).

        `flag` is the caller's command-line flag for the weights, named in error messages."""
        source = source or os.environ.get("DACVAE_WEIGHTS") or DEFAULT_WEIGHTS
        path = source if os.path.exists(source) else _download_weights(source, flag)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DACVAEError(f"{path} is not a readable DACVAE weights file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
        if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
                and isinstance(checkpoint.get("metadata", {}).get("kwargs"), dict)):
            raise DACVAEError(f"{path} is not a DACVAE weights file: expected a dict with 'state_dict' "
                              "and 'metadata': {'kwargs': ...} (the official layout)")
        model = cls(**checkpoint["metadata"]["kwargs"])
        model.load_state_dict_strict(checkpoint["state_dict"], path)
        return model.eval()

    def load_state_dict_strict(self, state_dict, name="state dict"):
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        extra = sorted(set(state_dict) - set(own))
        misshaped = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
                           for k in set(own) & set(state_dict) if tuple(state_dict[k].shape) != tuple(own[k].shape))
        if missing or extra or misshaped:
            parts = [f"{what}: {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}" for what, keys in
                     (("missing", missing), ("unexpected", extra), ("wrong shape", misshaped)) if keys]
            raise DACVAEError(f"{name} does not fit the DACVAE its kwargs describe; " + "; ".join(parts))
        self.load_state_dict(state_dict, strict=True)

    def save(self, path):
        """The official file layout: {'state_dict': ..., 'metadata': {'kwargs': ...}}, written atomically."""
        write_atomically(path, lambda f: torch.save({"state_dict": self.state_dict(),
                                                     "metadata": {"kwargs": self.kwargs}}, f))

    @torch.inference_mode()
    def encode(self, audio, chunk=CHUNK_FRAMES):
        """(B, 1, T) float at 48 kHz -> posterior mean (B, 128, ceil(T / hop))."""
        audio = torch.as_tensor(audio, dtype=torch.float32)
        if audio.ndim != 3 or audio.shape[1] != 1 or audio.shape[-1] == 0:
            raise ValueError(f"encode expects audio of shape (B, 1, T>0), got {tuple(audio.shape)}")
        audio = reflect_pad_right(audio, -audio.shape[-1] % self.hop)

        def encode_chunk(x):
            mean = self.quantizer.in_proj(self.encoder(x))[:, :self.codebook_dim]
            return (mean,)

        return map_chunks(encode_chunk, audio, self.hop, (1,), chunk, desc="encode")[0]

    @torch.inference_mode()
    def decode(self, latent, message=None, chunk=CHUNK_FRAMES, progress=True):
        """(B, 128, frames) -> (B, 1, frames * hop), with the watermark of `message` (default zeros);
        a progress bar over long latents unless progress=False."""
        latent = torch.as_tensor(latent, dtype=torch.float32)
        if latent.ndim != 3 or latent.shape[1] != self.codebook_dim or latent.shape[-1] == 0:
            raise ValueError(f"decode expects a latent of shape (B, {self.codebook_dim}, frames>0), "
                             f"got {tuple(latent.shape)}")
        message = message_tensor(message, latent.shape[0])
        front = lambda z: self.decoder.main_and_watermark_front(self.quantizer.out_proj(z))
        wm_rate = self.hop // math.prod(WATERMARK_RATES)
        head, h = map_chunks(front, latent, 1, (self.hop, wm_rate), chunk, desc="decode" if progress else None)
        h = self.decoder.watermark_middle(h, message)
        (residual,) = map_chunks(lambda x: (self.decoder.watermark_back(x),), h, wm_rate, (self.hop,), chunk)
        return head + WATERMARK_ALPHA * residual


def message_tensor(message, batch):
    """The 16 watermark bits as a (B, 16) float tensor; None means all zeros."""
    if message is None:
        return torch.zeros(batch, MESSAGE_BITS)
    m = torch.as_tensor(np.asarray(message, dtype=np.float32))
    if m.ndim == 1:
        m = m[None].expand(batch, -1)
    if m.shape != (batch, MESSAGE_BITS) or not bool(((m == 0) | (m == 1)).all()):
        raise DACVAEError(f"the watermark message must be {MESSAGE_BITS} bits of 0/1 (or one row per batch item)")
    return m


def _download_weights(repo_id, flag):
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise DACVAEError(f"DACVAE weights {repo_id!r} are neither an existing file nor a Hub repo id (ORG/NAME)")
    try:
        return hf_hub_download(repo_id, "weights.pth")
    except LocalEntryNotFoundError:  # the Hub was unreachable and nothing is cached
        raise DACVAEError(f"could not download DACVAE weights from the Hugging Face Hub ({repo_id}: unreachable); "
                          f"pass a local weights.pth with {flag} PATH or set DACVAE_WEIGHTS=PATH") from None
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise DACVAEError(f"the Hub has no weights.pth in {repo_id}; check the repo id, or pass a local file "
                          f"with {flag} PATH") from None
    except Exception as e:
        raise DACVAEError(f"could not download DACVAE weights from the Hugging Face Hub ({repo_id}: "
                          f"{type(e).__name__}); pass a local weights.pth with {flag} PATH or set "
                          "DACVAE_WEIGHTS=PATH") from None


def init_random(kwargs, seed=0):
    """A DACVAE of the given kwargs with random weights (for tests and offline demos)."""
    torch.manual_seed(seed)
    model = DACVAE(**kwargs)
    # Variance-preserving: unit-gain convs, and residual branches that start near identity, so
    # that activations stay O(1) through the depth and the decoder's tanh does not saturate.
    residual_outputs = {id(unit.block[3]) for unit in model.modules() if isinstance(unit, ResidualUnit)}
    for module in model.modules():
        if isinstance(module, (Conv, ConvTranspose)):
            v = module.weight_v if module.weight_norm else module.weight
            fan_in = v.shape[1] * v.shape[2] if isinstance(module, Conv) else v.shape[0] * v.shape[2] / module.stride
            gain = 0.1 if id(module) in residual_outputs else 1.0
            nn.init.normal_(v, std=gain / math.sqrt(fan_in))
            if module.weight_norm:
                module.weight_g.data = v.detach().norm(dim=(1, 2), keepdim=True)
    return model.eval()


# ----------------------------------------------------------------------------
# Audio files

def _riff_data_shortfall(path):
    """Bytes missing from a WAV's data chunk (libsndfile silently reads what is there)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        riff = f.read(12)
        if riff[:4] not in (b"RIFF", b"RIFX") or riff[8:12] != b"WAVE":
            return 0
        while True:
            header = f.read(8)
            if len(header) < 8:
                return 0
            chunk, length = header[:4], int.from_bytes(header[4:], "big" if riff[:4] == b"RIFX" else "little")
            if chunk == b"data":
                return 0 if length == 0xFFFFFFFF else max(0, f.tell() + length - size)
            f.seek(length + (length & 1), os.SEEK_CUR)


def load_audio(path, sample_rate=SAMPLE_RATE):
    """Any file soundfile reads (wav, flac, ogg, mp3, ...) -> mono float32 (T,) at `sample_rate`."""
    if not os.path.isfile(path):
        raise DACVAEError(f"audio file {path} does not exist")
    if os.path.getsize(path) == 0:
        raise DACVAEError(f"audio file {path} is empty (0 bytes)")
    try:
        info = soundfile.info(path)
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DACVAEError(f"{path} is not a readable audio file ({reason})") from None
    if audio.shape[0] == 0:
        raise DACVAEError(f"{path} contains no audio samples")
    if _riff_data_shortfall(path) or audio.shape[0] < 0.98 * info.frames:
        raise DACVAEError(f"{path} is truncated: its header promises more audio than the file holds")
    if not np.isfinite(audio).all():
        raise DACVAEError(f"{path} contains NaN or infinite samples")
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate, quality="HQ").astype(np.float32)
    return audio


def write_atomically(path, write):
    """storage.write_atomically(path, write), failing as one DACVAEError."""
    directory = os.path.dirname(os.path.abspath(path))
    if "://" not in path and not os.path.isdir(directory):
        raise DACVAEError(f"cannot write {path}: directory {directory} does not exist")
    try:
        storage.write_atomically(path, write)
    except OSError as e:
        raise DACVAEError(f"cannot write {path} ({e.strerror or e})") from None


def save_audio(path, audio, sample_rate=SAMPLE_RATE):
    """Write mono or (channels, T) audio atomically; the format follows the extension (wav: 16-bit)."""
    audio = np.asarray(audio, np.float32)
    audio = audio.T if audio.ndim == 2 else audio
    fmt = os.path.splitext(path)[1].lstrip(".").upper() or "WAV"
    if fmt not in soundfile.available_formats():
        raise DACVAEError(f"cannot write {path}: unknown audio format {fmt!r}")
    subtype = "PCM_16" if fmt in ("WAV", "FLAC", "AIFF") else None
    write_atomically(path, lambda f: soundfile.write(f, np.clip(audio, -1, 1), sample_rate, format=fmt,
                                                     subtype=subtype))


def save_npy(path, array):
    write_atomically(path, lambda f: np.save(f, array, allow_pickle=False))


def load_latent_npy(path, latent_size):
    """A (frames, latent_size) latent .npy; never unpickles."""
    try:
        latent = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DACVAEError(f"latent file {path} does not exist") from None
    except Exception as e:
        raise DACVAEError(f"{path} is not a readable .npy latent ({type(e).__name__})") from None
    if latent.ndim != 2 or latent.shape[1] != latent_size or latent.shape[0] == 0 \
            or not np.issubdtype(latent.dtype, np.floating):
        raise DACVAEError(f"{path} holds a {latent.dtype} array of shape {latent.shape}; expected "
                          f"(frames, {latent_size}) floats")
    if not np.isfinite(latent).all():
        raise DACVAEError(f"{path} contains NaN or infinite values")
    return latent.astype(np.float32)


def silence_latent(model, seconds=30.0):
    """The codec's own silence: mean latent of digital silence, (frames, 128) float16."""
    samples = int(round(seconds * model.sample_rate))
    return model.encode(torch.zeros(1, 1, samples))[0].T.numpy().astype(np.float16)


# ----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    weights_help = f"local weights.pth or Hub repo id (default: $DACVAE_WEIGHTS, else {DEFAULT_WEIGHTS})"
    p = sub.add_parser("encode", help="audio file -> (frames, 128) float16 latent .npy")
    p.add_argument("input", help="audio file (wav, flac, ogg, mp3, ...; any rate, mono or stereo)")
    p.add_argument("output", help="output .npy")
    p.add_argument("--weights", help=weights_help)
    p = sub.add_parser("decode", help="(frames, 128) latent .npy -> 48 kHz audio file")
    p.add_argument("input", help="latent .npy of shape (frames, 128)")
    p.add_argument("output", help="output audio file (.wav, .flac, ...)")
    p.add_argument("--weights", help=weights_help)
    p.add_argument("--message", default="0" * MESSAGE_BITS, help="16 watermark bits, e.g. 1011001011100010")
    p = sub.add_parser("silence", help="write the silence latent that pads training targets")
    p.add_argument("output", help="output .npy, (frames, 128) float16")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the silence (default 30 s = 750 frames)")
    p.add_argument("--weights", help=weights_help)
    p = sub.add_parser("init-random", help="write random weights in the official file layout")
    p.add_argument("output", help="output .pth")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="tiny: the test model (~0.4 M params); full: the released configuration (~108 M)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    # The Hub client retries with backoff on its own; its per-try warnings would bury our one line.
    hf_logging.set_verbosity_error()

    try:
        if args.command == "init-random":
            init_random(TINY_KWARGS if args.size == "tiny" else RELEASED_KWARGS, args.seed).save(args.output)
        elif args.command == "encode":
            model = DACVAE.load(args.weights)
            audio = load_audio(args.input, model.sample_rate)
            latent = model.encode(torch.from_numpy(audio)[None, None])[0].T.numpy()
            save_npy(args.output, latent.astype(np.float16))
        elif args.command == "decode":
            model = DACVAE.load(args.weights)
            bits = args.message.strip()
            if len(bits) != MESSAGE_BITS or set(bits) - {"0", "1"}:
                raise DACVAEError(f"--message must be {MESSAGE_BITS} characters of 0 and 1, got {args.message!r}")
            latent = load_latent_npy(args.input, model.codebook_dim)
            audio = model.decode(torch.from_numpy(latent.T)[None], [int(b) for b in bits])[0, 0].numpy()
            save_audio(args.output, audio, model.sample_rate)
        elif args.command == "silence":
            if not args.seconds > 0:
                raise DACVAEError(f"--seconds must be positive, got {args.seconds}")
            save_npy(args.output, silence_latent(DACVAE.load(args.weights), args.seconds))
    except DACVAEError as e:
        print(f"dacvae.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

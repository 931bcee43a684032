import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from conftest import DATA, REPO, UNREACHABLE_HUB, EarlyRun

import dacvae
from dacvae import DACVAE, DACVAEError

VECTORS = os.path.join(DATA, "dacvae_tiny")
WEIGHTS = os.path.join(VECTORS, "weights.pth")


@pytest.fixture(scope="module")
def tiny():
    return DACVAE.load(WEIGHTS)


@pytest.fixture(scope="module")
def expected():
    return np.load(os.path.join(VECTORS, "expected.npz"))


def tone(seconds, rate, freq=440.0, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "dacvae.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module", autouse=True)
def unreachable_hub_silence(tmp_path_factory):
    """`dacvae.py silence` with the Hub unreachable, from the module's start (it waits out the
    Hub client's retries): its output path and its EarlyRun."""
    out = tmp_path_factory.mktemp("unreachable_hub") / "s.npy"
    run = EarlyRun([sys.executable, os.path.join(REPO, "dacvae.py"), "silence", str(out)],
                   {**os.environ, **UNREACHABLE_HUB})
    yield out, run
    run.close()


# ---------------------------------------------------------------- parity

def test_parity_with_official_outputs(tiny, expected):
    assert sum(p.numel() for p in tiny.parameters()) == 374063
    audio = dacvae.load_audio(os.path.join(VECTORS, "input.wav"))
    assert audio.shape == (110400,)
    latent = tiny.encode(torch.from_numpy(audio)[None, None])
    assert latent.shape == (1, 128, 58)
    assert np.abs(latent.numpy() - expected["latent_mean"]).max() < 1e-4
    decoded = tiny.decode(torch.from_numpy(expected["latent_mean"]))
    assert decoded.shape == (1, 1, 111360)
    assert np.abs(decoded.numpy() - expected["decoded"]).max() < 1e-4
    decoded_msg = tiny.decode(torch.from_numpy(expected["latent_mean"]), expected["message_msg"][0].astype(int))
    assert np.abs(decoded_msg.numpy() - expected["decoded_msg"]).max() < 1e-4
    # The message really is in the audio, and decoding is deterministic.
    assert np.abs(decoded_msg.numpy() - decoded.numpy()).max() > 1e-4
    again = tiny.decode(torch.from_numpy(expected["latent_mean"]))
    assert torch.equal(again, decoded)


def test_full_size_config_builds_the_released_parameter_count():
    model = DACVAE(**dacvae.RELEASED_KWARGS)
    assert sum(p.numel() for p in model.parameters()) == 107_671_171
    assert model.hop == 1920


def test_very_short_inputs_are_padded_and_encoded(tiny):
    for n in (1, 2, 100, 1919, 1921):
        latent = tiny.encode(torch.randn(1, 1, n) * 0.1)
        assert latent.shape == (1, 128, -(-n // 1920)) and torch.isfinite(latent).all()


def test_reflect_padding_matches_torch_where_torch_can():
    x = torch.randn(2, 1, 50)
    for amount in (1, 10, 49):
        np.testing.assert_array_equal(dacvae.reflect_pad_right(x, amount),
                                      torch.nn.functional.pad(x, (0, amount), "reflect"))
    assert dacvae.reflect_pad_right(x, 500).shape[-1] == 550


# ---------------------------------------------------------------- loading

def _state(path=WEIGHTS):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("damage, names", [
    (lambda sd: sd.pop("decoder.model.1.block.3.weight"), "missing: decoder.model.1.block.3.weight"),
    (lambda sd: sd.__setitem__("encoder.block.9.bias", torch.zeros(3)), "unexpected: encoder.block.9.bias"),
    (lambda sd: sd.__setitem__("quantizer.in_proj.bias", torch.zeros(7)),
     "wrong shape: quantizer.in_proj.bias (7,) != (256,)"),
])
def test_strict_loading_names_the_offending_tensor(tmp_path, damage, names):
    checkpoint = _state()
    damage(checkpoint["state_dict"])
    path = tmp_path / "bad.pth"
    torch.save(checkpoint, path)
    with pytest.raises(DACVAEError, match=names.replace("(", r"\(").replace(")", r"\)")):
        DACVAE.load(str(path))


def test_model_is_built_from_the_file_kwargs(tmp_path):
    path = tmp_path / "other.pth"
    dacvae.init_random(dict(dacvae.TINY_KWARGS, latent_dim=24, decoder_dim=192)).save(str(path))
    model = DACVAE.load(str(path))
    assert model.kwargs["decoder_dim"] == 192 and model.decoder.wm_model.encoder_block.post[0].lstm.hidden_size == 64
    assert model.decode(torch.zeros(1, 128, 2)).shape == (1, 1, 3840)


def test_files_that_are_not_weights_and_code_in_pickles_are_refused(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(DACVAEError, match="is not a readable DACVAE weights file"):
        DACVAE.load(str(text))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "metadata": {"kwargs": {}}, "x": Exploit()}, evil)
    with pytest.raises(DACVAEError):
        DACVAE.load(str(evil))
    assert not marker.exists()
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(DACVAEError, match="official layout"):
        DACVAE.load(str(plain))


def test_load_through_a_hub_repo_id(hub, expected):
    hub.add_file("facebook/dacvae-tiny-test", "weights.pth", WEIGHTS)
    model = DACVAE.load("facebook/dacvae-tiny-test")
    decoded = model.decode(torch.from_numpy(expected["latent_mean"]))
    assert np.abs(decoded.numpy() - expected["decoded"]).max() < 1e-4
    assert ("GET", "/facebook/dacvae-tiny-test/resolve/main/weights.pth") in hub.requests
    with pytest.raises(DACVAEError, match="no weights.pth in nobody/nothing"):
        DACVAE.load("nobody/nothing")


def test_env_var_chooses_the_default_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("DACVAE_WEIGHTS", WEIGHTS)
    assert DACVAE.load().kwargs["decoder_dim"] == 96


# ---------------------------------------------------------------- long audio

def test_chunked_matches_unchunked_on_60_seconds(tiny):
    rng = np.random.default_rng(0)
    t = np.arange(60 * 48000) / 48000
    audio = (0.2 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 0.3 * t)
             + 0.05 * rng.normal(size=t.shape)).astype(np.float32)
    audio = torch.from_numpy(audio)[None, None]
    whole = tiny.encode(audio, chunk=10 ** 6)
    chunked = tiny.encode(audio, chunk=100)
    assert chunked.shape == (1, 128, 1500)
    assert (whole - chunked).abs().max() < 1e-3
    whole_audio = tiny.decode(whole, chunk=10 ** 6)
    chunked_audio = tiny.decode(whole, chunk=100)
    assert chunked_audio.shape == (1, 1, 1500 * 1920)
    assert (whole_audio - chunked_audio).abs().max() < 1e-3


# ---------------------------------------------------------------- audio files

@pytest.mark.parametrize("fmt, rate, channels", [
    ("wav", 48000, 1), ("wav", 22050, 2), ("flac", 44100, 1), ("flac", 16000, 2),
    ("ogg", 48000, 2), ("ogg", 24000, 1), ("mp3", 44100, 1), ("mp3", 22050, 2),
])
def test_load_audio_reads_formats_rates_and_channels(tmp_path, fmt, rate, channels):
    path = str(tmp_path / f"tone.{fmt}")
    soundfile.write(path, tone(1.0, rate, 440.0, channels), rate)
    audio = dacvae.load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 48000) < 2400  # mp3 adds encoder delay
    spectrum = np.abs(np.fft.rfft(audio[2400:45600]))
    peak_hz = np.argmax(spectrum) * 48000 / len(audio[2400:45600])
    assert abs(peak_hz - 440) < 5
    expected_rms = 0.3 / np.sqrt(2) * (0.75 if channels == 2 else 1.0)
    assert abs(np.sqrt(np.mean(audio[2400:45600] ** 2)) - expected_rms) < 0.1 * expected_rms


def _bad_files(tmp_path):
    x = tone(0.5, 48000)
    files = {}
    files["not audio"] = tmp_path / "notes.wav"
    files["not audio"].write_text("these are not samples")
    files["empty"] = tmp_path / "empty.wav"
    files["empty"].write_bytes(b"")
    files["no samples"] = tmp_path / "silent.wav"
    soundfile.write(files["no samples"], np.zeros((0,), np.float32), 48000)
    good = tmp_path / "good.wav"
    soundfile.write(good, x, 48000, subtype="PCM_16")
    files["truncated"] = tmp_path / "cut.wav"
    files["truncated"].write_bytes(good.read_bytes()[:30000])
    flac = tmp_path / "good.flac"
    soundfile.write(flac, x, 48000)
    files["truncated flac"] = tmp_path / "cut.flac"
    files["truncated flac"].write_bytes(flac.read_bytes()[:len(flac.read_bytes()) // 2])
    nan = x.copy()
    nan[100] = np.nan
    files["nan"] = tmp_path / "nan.wav"
    soundfile.write(files["nan"], nan, 48000, subtype="FLOAT")
    inf = x.copy()
    inf[5] = np.inf
    files["inf"] = tmp_path / "inf.wav"
    soundfile.write(files["inf"], inf, 48000, subtype="FLOAT")
    files["missing"] = tmp_path / "nowhere.wav"
    return files


BAD_MESSAGES = {"not audio": "is not a readable audio file", "empty": "is empty",
                "no samples": "contains no audio samples", "truncated": "is truncated",
                "truncated flac": "is not a readable audio file", "nan": "NaN or infinite",
                "inf": "NaN or infinite", "missing": "does not exist"}


def test_bad_audio_files_give_clear_errors(tmp_path):
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(DACVAEError) as err:
            dacvae.load_audio(str(path))
        assert str(path) in str(err.value) and BAD_MESSAGES[kind] in str(err.value), kind


def test_cli_bad_audio_is_one_line_and_writes_nothing(tmp_path):
    files = _bad_files(tmp_path)
    for kind in ("truncated", "nan", "missing"):
        out_path = tmp_path / f"{kind}.npy"
        out = run_cli("encode", str(files[kind]), str(out_path), "--weights", WEIGHTS)
        assert out.returncode == 2, kind
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert BAD_MESSAGES[kind] in out.stderr
        assert not out_path.exists()


def test_save_audio_is_atomic_and_readable(tmp_path):
    path = tmp_path / "out.wav"
    dacvae.save_audio(str(path), tone(0.25, 48000), 48000)
    data, rate = soundfile.read(path)
    assert rate == 48000 and len(data) == 12000
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]
    with pytest.raises(DACVAEError, match="does not exist"):
        dacvae.save_audio(str(tmp_path / "no" / "dir.wav"), tone(0.1, 48000))


# ---------------------------------------------------------------- CLI

def test_cli_round_trip(tmp_path):
    weights = tmp_path / "random.pth"
    out = run_cli("init-random", str(weights), "--size", "tiny", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert DACVAE.load(str(weights)).kwargs == DACVAE.load(WEIGHTS).kwargs
    wav = tmp_path / "in.flac"
    soundfile.write(wav, tone(2.3, 44100, channels=2), 44100)
    npy = tmp_path / "latent.npy"
    out = run_cli("encode", str(wav), str(npy), "--weights", str(weights))
    assert out.returncode == 0, out.stderr
    latent = np.load(npy)
    assert latent.dtype == np.float16 and latent.shape == (58, 128) and np.isfinite(latent).all()
    back = tmp_path / "back.wav"
    out = run_cli("decode", str(npy), str(back), "--weights", str(weights), "--message", "1011001011100010")
    assert out.returncode == 0, out.stderr
    audio, rate = soundfile.read(back)
    assert rate == 48000 and audio.shape == (58 * 1920,)
    silence = tmp_path / "silence.npy"
    out = run_cli("silence", str(silence), "--weights", str(weights))
    assert out.returncode == 0, out.stderr
    s = np.load(silence)
    assert s.dtype == np.float16 and s.shape == (750, 128)
    # Digital silence encodes to (nearly) one repeated frame away from the edges.
    assert np.abs(s[20:-20].astype(np.float32) - s[375].astype(np.float32)).max() < 1e-2
    for command in ("encode", "decode", "silence", "init-random"):
        assert run_cli(command, "--help").returncode == 0


def test_cli_rejects_bad_latents_and_flags(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((10, 64), np.float32))
    out = run_cli("decode", str(bad), str(tmp_path / "x.wav"), "--weights", WEIGHTS)
    assert out.returncode == 2 and "expected (frames, 128)" in out.stderr
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = run_cli("decode", str(pickled), str(tmp_path / "x.wav"), "--weights", WEIGHTS)
    assert out.returncode == 2 and "not a readable .npy latent" in out.stderr
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((3, 128), np.float16))
    out = run_cli("decode", str(good), str(tmp_path / "x.wav"), "--weights", WEIGHTS, "--message", "12")
    assert out.returncode == 2 and "--message" in out.stderr
    out = run_cli("silence", str(tmp_path / "s.npy"), "--seconds", "-1", "--weights", WEIGHTS)
    assert out.returncode == 2 and "--seconds" in out.stderr


def test_unreachable_hub_is_one_clear_sentence(unreachable_hub_silence):
    path, run = unreachable_hub_silence
    out = run.result()
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "could not download DACVAE weights" in out.stderr and "--weights" in out.stderr
    assert not path.exists()

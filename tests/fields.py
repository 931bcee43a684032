"""Stand-ins for EchoDiT in inference.py's sampler: velocity fields whose result is known exactly."""
import types

import jax.numpy as jnp

from model import EchoDiT


class FakeEchoDiT:
    """encode_conditions returns all-ones keys/values of shape (num_layers, B, St + Ss, 1, 1) and the
    condition mask; decode returns velocity(x, t, cond, has_text, has_speaker), where has_* say
    whether each row's pass sees that condition (False in a guidance pass that drops it)."""

    def __init__(self, velocity, latent_size=4, num_layers=2):
        self.velocity = velocity
        self.config = types.SimpleNamespace(latent_size=latent_size, num_layers=num_layers, blockwise=False)

    def apply(self, variables, *args, method=None):
        if method is EchoDiT.encode_conditions:
            text_ids, text_mask, speaker_latent, speaker_mask = args
            mask = jnp.concatenate([text_mask.astype(bool), speaker_mask.astype(bool)], axis=1)
            ones = jnp.ones((self.config.num_layers,) + mask.shape + (1, 1))
            return {"k": ones, "v": ones, "mask": mask}
        assert method is EchoDiT.decode
        x, t, cond, _ = args  # _: the start position, which a model without the prefix path ignores
        text_len = cond["mask"].shape[1] // 2  # the inputs below give text and speaker equal lengths
        has_text, has_speaker = cond["mask"][:, :text_len].any(1), cond["mask"][:, text_len:].any(1)
        return self.velocity(x, t, cond, has_text, has_speaker)


def fake_inputs(b=2, length=3, latent_size=4):
    """text_ids, text_mask, speaker_latent, speaker_mask with text and speaker both `length` long."""
    import numpy as np
    return (np.ones((b, length), np.int32), np.ones((b, length), np.int32),
            np.zeros((b, length, latent_size), np.float32), np.ones((b, length), np.int32))

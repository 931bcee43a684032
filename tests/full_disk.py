"""A disk that fills up at the run's second checkpoint: orbax's CheckpointManager.save raises ENOSPC
there. In-process tests pass pytest's monkeypatch.setattr; a subprocess runs FULL_DISK_WRAPPER."""
import os
import time

import orbax.checkpoint as ocp


def fill_at_the_second_save(patch=setattr):
    real, calls = ocp.CheckpointManager.save, []

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, step, *args, **kwargs)
    patch(ocp.CheckpointManager, "save", save)


class FullDiskWrite:
    """A background write (an orbax future) that meets a full disk."""

    def result(self, timeout=None):
        time.sleep(0.1)  # after save() has returned: the failure is met in the background
        raise OSError(28, "No space left on device")

    def cancel(self):
        pass


def fill_in_the_background_at_the_second_save(patch=setattr):
    """The second checkpoint's save returns, and its background write then fails."""
    real, calls = ocp.StandardCheckpointHandler.async_save, []

    async def async_save(self, *args, **kwargs):
        futures = await real(self, *args, **kwargs)
        calls.append(1)
        return [*(futures or []), FullDiskWrite()] if len(calls) == 2 else futures
    patch(ocp.StandardCheckpointHandler, "async_save", async_save)


# `python -c FULL_DISK_WRAPPER train_pretrain.py FLAGS...`: the trainer, on that disk.
FULL_DISK_WRAPPER = f"""
import runpy, sys
sys.modules.setdefault("tensorflow", None)  # as train_pretrain.py does, before orbax is imported
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import full_disk
full_disk.fill_at_the_second_save()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

"""Everything that knows the on-disk layout of checkpoints. Under a run's --checkpoint_dir (gs://BUCKET/PATH,
or a directory every host sees):

    step_XXXXXXX/            orbax: `state` (every host writes its own shards, in the background)
                             and `meta` (JSON: every host's data position, samples seen, config, flags)
    step_XXXXXXX.params.pkl  the weights in the seed's pickle format, for inference.py: written from
                             the committed step by process 0 in the background (Exporter), at the
                             end of an invocation and every --export_every steps
    step_XXXXXXX.unreadable-TIME[.params.pkl]  a damaged checkpoint, set aside
    run_flags.json           the flags the run started with (train_pretrain.restore_flags)
    metrics.jsonl            a copy of the metrics at the last checkpoint

and the seed's pickle format (`../shared/spec/formats.md`), read with restricted unpickling: a full
training checkpoint (`python train_pretrain.py export`) or weights only. disk_watchdog.py keeps its
own copy of these names (it must not import jax); tests hold it against what this module writes.
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import queue
import re
import threading
import time

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore
from etils import epath
from jax.experimental import multihost_utils

import model
import pod
import storage

log = logging.getLogger("checkpoint")

STEP_DIR = re.compile(r"^step_(\d{7})$")  # a committed orbax checkpoint
EXPORT = re.compile(r"^step_(\d{7})\.params\.pkl$")  # the weights-only pickle beside it
RUN_FLAGS_FILE = "run_flags.json"
METRICS_HISTORY_FILE = "metrics.jsonl"
BUFFER_GB = 2  # orbax's bound on the host memory a save or restore holds at once


def step_path(directory, step):
    """A training checkpoint's step directory (as `manager` names them)."""
    return os.path.join(directory, f"step_{step:07d}")


def export_path(directory, step):
    """The weights-only pickle written beside a step directory."""
    return step_path(directory, step) + ".params.pkl"


# ----------------------------------------------------------------------------
# Reading any checkpoint (pickle or training directory). Reading never runs code from the file.

class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt or does not fit; main()s print it as one sentence."""


class _Boxed:
    """Stand-in for Flax's LogicallyPartitioned / Partitioned boxes: keeps the state, never runs code."""

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict, slots) from dataclass pickling
            state = {k: v for part in state if isinstance(part, dict) for k, v in part.items()}
        self.__dict__.update(state)


_SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("builtins", "slice"), ("collections", "OrderedDict"),
    ("copyreg", "__newobj__"), ("copyreg", "_reconstructor"), ("builtins", "object"), ("builtins", "tuple"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "complex"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("numpy") and name.endswith("DType"):  # numpy 2 dtype classes
            return super().find_class(module, name)
        if name in ("LogicallyPartitioned", "Partitioned") and module.startswith("flax"):
            return _Boxed
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: checkpoints hold only arrays, "
                                     "containers and scalars")


def _unbox(tree):
    if isinstance(tree, _Boxed):
        return _unbox(tree.__dict__.get("value"))
    if isinstance(tree, dict):
        return {k: _unbox(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_unbox(v) for v in tree)
    return tree


def checkpoint_file_exists(path):
    """Whether a checkpoint pickle exists: a local file, or an object on gs:// (a bucket every host reads)."""
    if "://" in path:
        try:
            return epath.Path(path).is_file()
        except Exception:  # an unreachable bucket or a refused request counts as missing
            return False
    return os.path.isfile(path)


def load_checkpoint_file(path):
    """Read a checkpoint .pkl (a local path, or gs://... through etils.epath) with restricted
    unpickling; Flax boxes are unwrapped."""
    if not checkpoint_file_exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if "://" in path:
            opened = epath.Path(path).open("rb")
        else:
            opened = open(path, "rb")
        with opened as f:
            payload = _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} is not a safe checkpoint ({e})") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("params"), dict):
        raise CheckpointError(f"{path} is not an Echo checkpoint: expected a dict with 'params'")
    return _unbox(payload)


def committed(step_dir):
    """Whether orbax has finished a step directory: on gs:// a step is written in place and marked
    complete by its commit file, so a reader during a save or after an interrupted one would
    otherwise take half a checkpoint."""
    return (step_dir / "state").is_dir() and ocp.step.is_path_finalized(step_dir)


def find_checkpoint_step(path):
    """(checkpoint directory, step) for a training checkpoint directory (its newest committed step)
    or one of its step_XXXXXXX directories; local or gs://."""
    where = epath.Path(path)
    m = STEP_DIR.match(where.name)
    if m and committed(where):
        return str(where.parent), int(m.group(1))
    steps = [int(m.group(1)) for m in map(STEP_DIR.match, sorted(p.name for p in where.iterdir()))
             if m and committed(where / m.group(0))] if where.is_dir() else []
    if not steps:
        raise CheckpointError(f"{path} holds no complete training checkpoint (step_XXXXXXX directories)")
    return str(where), max(steps)


def load_checkpoint_dir(path):
    """The weights of a training checkpoint (directory, or one step of it; local or gs://) as a
    weights-only payload: its .params.pkl export where there is one, else the params and EMA weights
    read from the orbax checkpoint (a preemption save has no export)."""
    directory, step = find_checkpoint_step(path)
    export = export_path(directory, step)
    if epath.Path(export).is_file():
        return load_checkpoint_file(export)
    step_dir = step_path(directory, step)
    try:
        meta = storage.read_json(os.path.join(step_dir, "meta", "metadata"))
        checkpointer = ocp.PyTreeCheckpointer()
        tree = stored_tree(step_dir)
        keys = [k for k in ("params", "ema_params") if k in tree]
        as_numpy = {k: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree[k]) for k in keys}
        with reads_finish_before_their_loop_closes():
            weights = checkpointer.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
                item={k: tree[k] for k in keys}, restore_args=as_numpy, partial_restore=True))
    except Exception as e:  # a damaged checkpoint raises whatever its reader meets
        raise CheckpointError(f"{step_dir} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    return {**weights, "step": meta["step"], **for_inference(meta)}


def for_inference(meta):
    """What inference needs besides the weights, from a step's meta: the config, the trained
    lengths and the silence latent."""
    return {"config": meta["config"], "max_lengths": meta["max_lengths"],
            "silence_latent": np.asarray(meta["silence_latent"], np.float16)}


def stored_tree(step_dir):
    """The tree of a step's train state as stored (nested dicts of orbax ArrayMetadata, each naming
    its array's directory), read through the handler: the manager keeps no checkpointer metadata."""
    return ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir, "state")).tree


def load_checkpoint(path):
    """A checkpoint pickle (full or weights-only) or a training checkpoint directory; local or gs://."""
    return load_checkpoint_dir(path) if epath.Path(path).is_dir() else load_checkpoint_file(path)


def config_from_checkpoint(payload, path="checkpoint"):
    """The model.EchoConfig stored in a checkpoint, or one inferred from its parameter shapes."""
    stored = payload.get("config")
    if isinstance(stored, dict):
        known = {f.name for f in dataclasses.fields(model.EchoConfig)}
        return model.EchoConfig(**{k: v for k, v in stored.items() if k in known})
    flat = model.flatten(payload["params"])
    try:
        if "in_proj/kernel" not in flat:
            raise KeyError("in_proj/kernel")
        latent, d = flat["in_proj/kernel"].shape
        emb = flat["text_encoder/text_embedding/embedding"]
        ds = flat["speaker_encoder/in_proj/kernel"].shape[1]
        p = flat["speaker_encoder/in_proj/kernel"].shape[0] // latent
        count = lambda prefix: len({k.split("/")[len(prefix.split("/")) - 1] for k in flat if k.startswith(prefix)})
        if "layers/mlp/w1/kernel" in flat:  # our stacked layout
            layers = flat["layers/mlp/w1/kernel"].shape[0]
            text_layers = flat["text_encoder/layers/mlp/w1/kernel"].shape[0]
            spk_layers = flat["speaker_encoder/layers/mlp/w1/kernel"].shape[0]
            heads = flat["layers/attention/q_norm/weight"].shape[1]
            text_heads = flat["text_encoder/layers/attention/q_norm/weight"].shape[1]
            spk_heads = flat["speaker_encoder/layers/attention/q_norm/weight"].shape[1]
            mlp, text_mlp, spk_mlp = (flat[f"{p_}layers/mlp/w1/kernel"].shape[2]
                                      for p_ in ("", "text_encoder/", "speaker_encoder/"))
            rank = flat["layers/attn_adaln/adaln_rank_shift/kernel"].shape[2]
        else:  # the reference per-layer layout
            layers = count("TransformerBlock_")
            text_layers = count("text_encoder/TextTransformerBlock_")
            spk_layers = count("speaker_encoder/EncoderTransformerBlock_")
            heads = flat["TransformerBlock_0/attention/q_norm/weight"].shape[0]
            text_heads = flat["text_encoder/TextTransformerBlock_0/attention/q_norm/weight"].shape[0]
            spk_heads = flat["speaker_encoder/EncoderTransformerBlock_0/attention/q_norm/weight"].shape[0]
            mlp = flat["TransformerBlock_0/mlp/w1/kernel"].shape[1]
            text_mlp = flat["text_encoder/TextTransformerBlock_0/mlp/w1/kernel"].shape[1]
            spk_mlp = flat["speaker_encoder/EncoderTransformerBlock_0/mlp/w1/kernel"].shape[1]
            rank = flat["TransformerBlock_0/attn_adaln/adaln_rank_shift/kernel"].shape[1]
        return model.EchoConfig(model_size=d, num_layers=layers, num_heads=heads, intermediate_size=mlp,
                                latent_size=latent, timestep_embed_size=flat["cond_dense_0/kernel"].shape[0],
                                adaln_rank=rank, encoder_model_size=ds, encoder_num_layers=spk_layers,
                                encoder_num_heads=spk_heads, encoder_intermediate_size=spk_mlp, encoder_patch_size=p,
                                text_vocab_size=emb.shape[0], text_model_size=emb.shape[1], text_num_layers=text_layers,
                                text_num_heads=text_heads, text_intermediate_size=text_mlp)
    except (KeyError, IndexError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path} has no config and its parameters do not describe an Echo DiT "
                              f"(missing or odd {e})") from None


def params_from_checkpoint(payload, config: model.EchoConfig, path="checkpoint", key="params",
                           prefix_path_optional=False):
    """Parameters of a loaded checkpoint (`key`: "params", or "ema_params" for the EMA weights) in
    this model's layout (stacked or reference per-layer). With prefix_path_optional, a blockwise
    config also takes a checkpoint trained without the latent-prefix path: the tree then lacks
    those parameters, for the caller to initialise."""
    params = payload[key]
    flat = model.flatten(params)
    if prefix_path_optional and config.blockwise and not any(k.startswith("latent_encoder/") for k in flat):
        config = dataclasses.replace(config, blockwise=False)
    try:
        if any(k.startswith("TransformerBlock_") for k in flat):
            return model.import_reference_params(flat, config)
        # Our own layout, stacked or unrolled as it was trained (the demo preset unrolls), through the
        # reference layout into this config's, which checks every shape.
        trained = dataclasses.replace(config, scan_layers=any(k.startswith("layers/") for k in flat))
        return model.import_reference_params(model.export_reference_params(params, trained), config)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit the model config: {e}") from None


# ----------------------------------------------------------------------------
# Training checkpoints: orbax step directories, written and read by every host

def manager(directory, keep=0, keep_period=0):
    """The orbax manager of a checkpoint directory. It removes the temporary directories of
    interrupted saves when it opens, and keeps the newest `keep` checkpoints (0: all) plus every
    `keep_period`-th step."""
    # One zarr array per leaf (no OCDBT): every host writes its own chunk objects and nothing is
    # updated in place, so any store that can write an object serves (OCDBT's shared manifest needs
    # conditional writes, which the Cloud Storage emulator of the tests lacks). A few hundred leaves
    # make a few thousand objects per checkpoint on a v4-64.
    handlers = {"state": ocp.StandardCheckpointHandler(save_concurrent_gb=BUFFER_GB, restore_concurrent_gb=BUFFER_GB,
                                                       use_ocdbt=False),
                "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, keep_period=keep_period or None,
                                           step_prefix="step", step_format_fixed_length=7,
                                           cleanup_tmp_directories=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager, state, step, data_state, meta):
    """Every process joins. Orbax copies this host's shards off the devices and writes them in the
    background, with `meta` (JSON: the step, the flags, what inference needs, ...) and every host's
    `data_state`. Returns the seconds training waited."""
    directory = str(manager.directory)
    started = time.perf_counter()
    meta = {**meta, "step": step, "data_states": pod.gather_json(data_state)}
    try:  # also raises what the background write of the previous checkpoint met (a full disk, say)
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                     force=True)
    except Exception as e:
        raise CheckpointError(f"writing a checkpoint to {directory} failed ({type(e).__name__}: {str(e)[:200]}); "
                              "free space there or fix its permissions, then rerun to resume from the last complete "
                              "checkpoint") from None
    if jax.process_index() == 0:
        storage.write_json(os.path.join(directory, RUN_FLAGS_FILE), meta["flags"])
        prune_exports(directory, manager.all_steps())
    return time.perf_counter() - started


def wait_committed(manager, step):
    """Wait for the background write of checkpoint `step` (at once when it has ended) and raise what
    it met as one sentence: a failed write stops the run within a step of its end, not at the next
    save, and the checkpoints before it are untouched."""
    try:
        manager.wait_until_finished()  # re-raises what orbax's finalize thread met
        manager.check_for_errors()
    except Exception as e:
        raise CheckpointError(f"writing checkpoint {step_path(str(manager.directory), step)} failed in the "
                              f"background ({describe(e)}); the checkpoints before it are intact: free space there "
                              "or fix its permissions, then rerun to resume from the last complete one") from None


def prune_exports(directory, kept_steps):
    """Remove the weights-only exports of checkpoints orbax has pruned."""
    for path in epath.Path(directory).glob("step_*.params.pkl"):
        m = EXPORT.match(path.name)
        if m and int(m.group(1)) not in kept_steps:
            path.unlink(missing_ok=True)


# What a reader meets in a checkpoint whose bytes are incomplete or corrupt (tensorstore's status codes
# for a missing object or a short read, a decoder's complaint, unparsable JSON). Anything else (a model
# that does not match, out of memory, permissions, the network) says nothing about the checkpoint.
DAMAGE = re.compile(r"NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|[Cc]orrupt|Error decoding|[Cc]hecksum|JSONDecodeError|"
                    r"FileNotFoundError|No such file")


def causes(error):
    """An exception and the ones it was raised from, outermost first (orbax wraps tensorstore's
    status in a message of its own)."""
    chain = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def is_damage(error):
    return any(DAMAGE.search(f"{type(e).__name__}: {e}") for e in causes(error))


def describe(error):
    """One line for an exception from a reader: the root cause's type and the first line of its
    message, without the tensorstore spec it appends."""
    root = causes(error)[-1]
    message = str(root).split(" [tensorstore_spec")[0].strip().splitlines()
    return f"{type(root).__name__}: {(message[0] if message else '')[:240]}"


def model_mismatch(saved, target):
    """Where the params saved in a checkpoint differ from the ones this run builds (None: they match)."""
    saved_params = flax.traverse_util.flatten_dict(dict(saved.get("params", {})), sep="/")
    wanted_params = flax.traverse_util.flatten_dict(dict(target["params"]), sep="/")
    shape = lambda tree, k: str(tuple(tree[k].shape)) if k in tree else "absent"
    differ = [k for k in saved_params.keys() | wanted_params.keys()
              if shape(saved_params, k) != shape(wanted_params, k)]
    if not differ:
        return None
    first = min(differ, key=lambda k: (k not in saved_params or k not in wanted_params, k))  # a shape first
    return (f"params/{first}: {shape(saved_params, first)} saved, {shape(wanted_params, first)} here; "
            f"{len(differ)} of {len(wanted_params)} arrays differ")


def read_step(directory, step, target):
    """One host's part of a checkpoint: (state, meta), straight from orbax's handlers. Unlike the
    manager's restore it ends in no barrier, so a host that fails here still meets the others in the
    verdict that follows."""
    path = epath.Path(step_path(directory, step))
    handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=BUFFER_GB)
    try:
        saved = handler.metadata(path / "state")
        saved = getattr(saved, "tree", saved)
        mismatch = model_mismatch(saved, target)
        if mismatch:
            raise ModelMismatch(mismatch)
        wanted = dict(target)
        if "ema_params" in wanted and "ema_params" not in saved:
            del wanted["ema_params"]
            log.warning("checkpoint %d holds no EMA weights: they start from its params", step)
        with reads_finish_before_their_loop_closes():
            state = dict(handler.restore(path / "state", args=ocp.args.StandardRestore(wanted)))
    finally:
        handler.close()
    meta = ocp.JsonCheckpointHandler().restore(path / "meta")
    if "ema_params" in target and "ema_params" not in state:
        state["ema_params"] = jax.tree.map(lambda p: p.copy(), state["params"])
    return state, meta


class ReadsFinishingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that lets its unfinished tasks run to their end before it closes. Orbax runs a
    restore in a loop of its own and closes it as soon as one array read fails, with the others in
    flight: each of them then prints a traceback when its bytes arrive, and another when it is
    collected, at any later moment (thousands of lines for a large damaged checkpoint)."""

    def close(self):
        if not self.is_closed() and not self.is_running():
            unfinished = asyncio.all_tasks(self)
            if unfinished:
                self.run_until_complete(asyncio.gather(*unfinished, return_exceptions=True))
        super().close()


class ReadsFinishingPolicy(asyncio.DefaultEventLoopPolicy):
    """Makes ReadsFinishingEventLoops."""

    def new_event_loop(self):
        return ReadsFinishingEventLoop()


@contextlib.contextmanager
def reads_finish_before_their_loop_closes():
    """Within: the event loops orbax makes are ReadsFinishingEventLoops."""
    before = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(ReadsFinishingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(before)


class ModelMismatch(Exception):
    """The checkpoint's params are not those of the model this run builds."""


def restore_newest(manager, target):
    """The newest checkpoint, each host reading only its own shards straight onto its devices
    (`target`: the state's ShapeDtypeStructs with their shardings): (state, meta), or None when the
    directory holds none. Every host reads, then all agree (one collective): a step is set aside, and
    the one before it tried, only when every host that failed met damaged bytes; any other failure
    stops the run, naming the step and the cause, and moves nothing."""
    directory = str(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        restored, verdict = None, None
        try:
            restored = read_step(directory, step, target)
        except ModelMismatch as e:
            verdict = {"damaged": False, "cause": f"it holds another model than this run builds ({e})",
                       "fix": "resume with the flags that wrote it (their record is run_flags.json beside it), or "
                              "start a new run in another --checkpoint_dir"}
        except Exception as e:  # a reader raises whatever it meets: sorted by what it says
            cause = describe(e)
            verdict = {"damaged": is_damage(e), "cause": cause,
                       "fix": "fix the cause (memory, permissions, credentials, network) and rerun the same command"}
        verdicts = pod.gather_json(verdict)
        failed = [(host, v) for host, v in enumerate(verdicts) if v is not None]
        if not failed:
            return restored
        path = step_path(directory, step)
        hosts = "" if len(verdicts) == 1 else f" on host(s) {', '.join(str(h) for h, _ in failed)}"
        if not all(v["damaged"] for _, v in failed):
            v = next(v for _, v in failed if not v["damaged"])
            raise CheckpointError(f"cannot restore {path}{hosts}: {v['cause']}; {v['fix']}. No checkpoint was "
                                  "moved")
        cause = failed[0][1]["cause"]
        if i + 1 == len(steps):
            raise CheckpointError(f"no checkpoint in {directory} is readable (the oldest, {path}, is damaged"
                                  f"{hosts}: {cause}); restore them, or start a new run in another --checkpoint_dir")
        log.warning("checkpoint %s is damaged%s (%s): set aside; resuming from step %d, which loses %d steps",
                    path, hosts, cause, steps[i + 1], step - steps[i + 1])
        set_aside(manager, step)
    return None


def set_aside(manager, step):
    """Rename an unreadable checkpoint (and its export) to STEP_DIR.unreadable-TIME, out of the way of
    the step that will be saved again under its name (and of pruning, which would count it); nothing
    is deleted."""
    path, export = step_path(str(manager.directory), step), export_path(str(manager.directory), step)
    aside = f"{path}.unreadable-{int(time.time())}"
    error = None
    if jax.process_index() == 0:
        try:
            epath.Path(path).rename(aside)
            if epath.Path(export).exists():
                epath.Path(export).rename(aside + ".params.pkl")
            log.warning("moved the unreadable checkpoint to %s", aside)
        except OSError as e:
            error = str(e)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("unreadable checkpoint set aside")
    if pod.failed_hosts(error is None):
        raise CheckpointError(f"cannot move the unreadable checkpoint {path} aside ({error or 'on process 0'}); "
                              "move or remove it, then restart")
    manager.reload()


# ----------------------------------------------------------------------------
# Pickles of the seed's format, written one array at a time

class StreamingPickler(pickle.Pickler):
    """Pickles a tree whose array leaves are fetched as numpy one at a time, when pickle reaches
    them (`fetch(leaf)`: the numpy array, or None for an ordinary object), so that only one whole
    array is ever on the host. Fast mode keeps no memo, which would hold every array until the end."""

    def __init__(self, file, fetch):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.fast = True
        self.fetch = fetch

    def reducer_override(self, obj):
        array = self.fetch(obj)
        return NotImplemented if array is None else np.asarray(array).__reduce_ex__(pickle.HIGHEST_PROTOCOL)


class StoredArray:
    """One array of a checkpoint on disk (a zarr directory), read only when it is pickled."""

    def __init__(self, path):
        self.path = path

    def read(self):
        kvstore = self.path if "://" in self.path else {"driver": "file", "path": self.path}  # gs:// as a URL
        return tensorstore.open({"driver": "zarr", "kvstore": kvstore}).result().read().result()


def export_weights(directory, step):
    """Write the weights-only pickle of the seed's format ({"params", "ema_params", "step", "config",
    "max_lengths", "silence_latent"}) beside committed step `step`, read back from storage one array
    at a time: no device and no other host takes part. Raises CheckpointError."""
    step_dir, out = step_path(directory, step), export_path(directory, step)
    try:
        if not committed(epath.Path(step_dir)):
            raise CheckpointError(f"{step_dir} is not a committed checkpoint")
        meta = storage.read_json(os.path.join(step_dir, "meta", "metadata"))
        stored = stored_tree(step_dir)
        weights = {key: jax.tree.map(lambda node: StoredArray(os.path.join(step_dir, "state", node.name)), stored[key])
                   for key in ("params", "ema_params") if key in stored}
        payload = {**weights, "step": step, **for_inference(meta)}
        storage.write_atomically(out, lambda f: StreamingPickler(f, read_stored).dump(payload))
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot write {out} ({e.strerror or e})") from None
    except Exception as e:  # a damaged array raises whatever tensorstore meets
        raise CheckpointError(f"{step_dir} is not a readable checkpoint ({describe(e)})") from None


class Exporter:
    """The weights-only exports of committed steps (export_weights), written by process 0 in a thread
    of its own: the loop never waits for one, and the other hosts never know. `finish` waits for the
    exports asked for; a process that ends without it (a preemption) abandons the one in progress,
    whose temporary file never takes the export's name."""

    def __init__(self, directory):
        self.directory = directory
        self.steps = queue.Queue()
        self.thread = None

    def submit(self, step):
        if jax.process_index() != 0:
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="export", daemon=True)
            self.thread.start()
        self.steps.put(step)

    def run(self):
        while (step := self.steps.get()) is not None:
            if epath.Path(export_path(self.directory, step)).exists():
                continue
            started = time.perf_counter()
            try:
                export_weights(self.directory, step)
            except CheckpointError as e:  # the checkpoint itself stays whole: inference reads it directly
                log.warning("no weights-only export of step %d: %s; inference.py --checkpoint %s reads the "
                            "checkpoint itself", step, e, step_path(self.directory, step))
                continue
            log.info("wrote %s in %.1f s", export_path(self.directory, step), time.perf_counter() - started)

    def finish(self):
        """Wait until every export asked for is written (or has failed, with a warning)."""
        if self.thread is not None:
            self.steps.put(None)
            self.thread.join()
            self.thread = None


def read_stored(obj):
    """StreamingPickler's fetch for trees of StoredArray leaves."""
    return obj.read() if isinstance(obj, StoredArray) else None


def export_full(source, out, abstract_state):
    """A training checkpoint (its directory, or one step of it) as one pickle of the seed's full
    format (params, opt_state, step, samples_seen, EMA weights, config, data positions, flags), which
    --resume and --init_from read. `abstract_state(meta, has_ema)` gives the train state's tree for
    the checkpoint's own meta. Each array is read when the pickle reaches it: the host holds one
    array at a time. Returns (directory, step)."""
    try:
        directory, step = find_checkpoint_step(source)
        step_dir = step_path(directory, step)
        meta = storage.read_json(os.path.join(step_dir, "meta", "metadata"))
        stored = stored_tree(step_dir)
        abstract = abstract_state(meta, "ema_params" in stored)
    except (CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source} is not a readable training checkpoint ({type(e).__name__}: {str(e)[:200]})") \
            from None

    def leaf(path, _):
        node = stored
        for key in path:  # dict keys, namedtuple fields, list indices: orbax's tree mirrors the state's
            node = node[getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))]
        return StoredArray(os.path.join(step_dir, "state", node.name))

    lazy = jax.tree_util.tree_map_with_path(leaf, {k: v for k, v in abstract.items() if k != "step"})
    payload = {key: flax.serialization.to_state_dict(value) for key, value in lazy.items()}
    payload.update(step=step, samples_seen=meta["samples_seen"], **for_inference(meta),
                   data_states=meta["data_states"], train_args=meta["flags"])
    try:
        storage.write_atomically(out, lambda f: StreamingPickler(f, read_stored).dump(payload))
    except OSError as e:
        raise CheckpointError(f"cannot write {out} ({e.strerror or e})") from None
    except Exception as e:  # a damaged array raises whatever tensorstore meets
        raise CheckpointError(f"{step_dir} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") \
            from None
    return directory, step

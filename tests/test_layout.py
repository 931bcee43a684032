"""How the scripts are laid out: one owner per concern, no import cycle, imports at the top, short
functions, and the disk watchdog's copy of the checkpoint names held against what checkpoint.py
and the trainer write."""
import ast
import glob
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from etils import epath

import checkpoint
import disk_watchdog
import train_pretrain

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "*.py")))
MODULES = {os.path.basename(p)[:-3] for p in SCRIPTS}
# Imported inside a function: optional, heavy dependencies that some uses of a module never need.
OPTIONAL = {"torch", "dacvae", "PIL", "torch.utils.tensorboard", "etils", "huggingface_hub"}
# Functions longer than LONGEST lines, and why.
LONG_FUNCTIONS = {
    ("train_pretrain.py", "build_parser"): "one line or two per flag",
    ("monitor.py", "make_handler"): "the HTTP handler class, its routes nested in it",
}
LONGEST = 80


def parsed(path):
    with open(path) as f:
        source = f.read()
    return source.splitlines(), ast.parse(source)


def imported_modules(node):
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module] if isinstance(node, ast.ImportFrom) and node.module else []


def test_the_scripts_import_each_other_without_a_cycle():
    graph = {}
    for path in SCRIPTS:
        _, tree = parsed(path)
        graph[os.path.basename(path)[:-3]] = {name.split(".")[0] for node in ast.walk(tree)
                                              for name in imported_modules(node)} & MODULES
    state = {}

    def visit(module, trail):
        state[module] = "open"
        for other in sorted(graph[module]):
            assert state.get(other) != "open", f"import cycle: {' -> '.join(trail + [module, other])}"
            if other not in state:
                visit(other, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert "corpus" in graph["train_pretrain"] and "data" in graph["corpus"] and "corpus" not in graph["data"]


def test_imports_inside_functions_are_optional_dependencies_with_a_reason():
    found = []
    for path in SCRIPTS:
        lines, tree = parsed(path)
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                for name in imported_modules(node):
                    reason = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                    if name not in OPTIONAL or not reason:
                        found.append(f"{os.path.basename(path)}:{node.lineno} {lines[node.lineno - 1].strip()}")
    assert not found, found


def test_functions_fit_on_a_screen():
    long = []
    for path in SCRIPTS:
        _, tree = parsed(path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST and (os.path.basename(path), node.name) not in LONG_FUNCTIONS:
                    long.append(f"{os.path.basename(path)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_only_checkpoint_py_and_the_watchdog_name_checkpoints():
    """The step directory pattern lives in checkpoint.py; the watchdog keeps its own copy (it must
    not import jax) and the next test holds it to checkpoint.py's."""
    pattern = re.compile(r"step_(\{|\\d|\(\\d)")
    owners = ("checkpoint.py", "disk_watchdog.py")
    elsewhere = [f"{os.path.basename(p)}:{i}" for p in SCRIPTS if os.path.basename(p) not in owners
                 for i, line in enumerate(parsed(p)[0], 1) if pattern.search(line)]
    assert not elsewhere, elsewhere


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A checkpoint directory as checkpoint.py writes it (two steps with their exports, one set
    aside as unreadable) and a run's audio-sample directories, made by the real code."""
    root = tmp_path_factory.mktemp("layout")
    directory = str(root / "checkpoints")
    manager = checkpoint.manager(directory)
    state = {"params": {"w": jnp.ones((4, 4))}, "step": jnp.zeros((), jnp.int32)}
    meta = {"flags": {}, "config": {}, "max_lengths": {}, "silence_latent": [[0.0]]}
    for step in (1, 2, 3):
        checkpoint.save(manager, state, step, {"epoch": 0}, {**meta, "samples_seen": step})
    manager.wait_until_finished()
    for step in (1, 2, 3):
        checkpoint.export_weights(directory, step)
    checkpoint.set_aside(manager, 1)
    manager.close()
    samples = [train_pretrain.samples_dir(str(root), step) for step in (2, 3)]
    for path in samples:
        os.makedirs(path)
    return root, sorted(os.listdir(directory)), [os.path.basename(p) for p in samples]


def test_the_watchdog_knows_checkpoint_py_names(written):
    _, names, samples = written
    assert "run_flags.json" in names
    steps = {int(m.group(1)) for m in map(disk_watchdog.CHECKPOINT_RE.match, names) if m}
    assert steps == {2, 3}, names  # step directories and their .params.pkl exports
    assert {n for n in names if checkpoint.STEP_DIR.match(n) or checkpoint.EXPORT.match(n)} == {
        "step_0000002", "step_0000002.params.pkl", "step_0000003", "step_0000003.params.pkl"}, names
    aside = [n for n in names if ".unreadable-" in n]
    assert len(aside) == 2 and all(disk_watchdog.LEFTOVER_RE.match(n) for n in aside), names
    assert not any(disk_watchdog.CHECKPOINT_RE.match(n) or checkpoint.STEP_DIR.match(n) for n in samples), samples


def test_the_watchdog_never_takes_audio_samples_for_checkpoints(written):
    root, _, _ = written
    watchdog = disk_watchdog.Watchdog([str(root)], min_free_gb=0, critical_gb=0, keep_checkpoints=1, dry_run=True,
                                      metrics_file=None)
    candidates = [path for _, paths in watchdog.old_checkpoints(opened=set()) for path in paths]
    assert candidates and all(os.path.dirname(p) == str(root / "checkpoints") for p in candidates), candidates
    assert {os.path.basename(p) for p in candidates} == {"step_0000002", "step_0000002.params.pkl"}


def test_a_checkpoint_of_this_layout_loads_for_inference(written):
    root, _, _ = written
    loaded = checkpoint.load_checkpoint(str(root / "checkpoints"))
    assert loaded["step"] == 3
    np.testing.assert_array_equal(loaded["params"]["w"], np.ones((4, 4)))
    assert jax.process_count() == 1


def test_the_watchdog_prunes_nothing_for_a_step_still_being_written(written, tmp_path):
    """A step directory without orbax's commit file (a save under way, or one cut short) is not a
    checkpoint: it must not push the newest committed one out of the `keep` newest."""
    root, _, _ = written
    copy = tmp_path / "checkpoints"
    shutil.copytree(root / "checkpoints", copy)
    (copy / "step_0000003" / disk_watchdog.COMMIT_FILE).unlink()
    watchdog = disk_watchdog.Watchdog([str(tmp_path)], min_free_gb=0, critical_gb=0, keep_checkpoints=1, dry_run=True,
                                      metrics_file=None)
    assert watchdog.old_checkpoints(opened=set()) == []


def test_readers_take_only_committed_steps_on_gs(gcs):
    """On Cloud Storage orbax writes a step in place and commits it last: a reader during the save, or
    after one cut short, must take the step before."""
    directory = f"gs://{gcs}/committed-{os.getpid()}"
    manager = checkpoint.manager(directory)
    state = {"params": {"w": jnp.ones((4, 4))}, "step": jnp.zeros((), jnp.int32)}
    meta = {"flags": {}, "config": {}, "max_lengths": {}, "silence_latent": [[0.0]]}
    for step in (1, 2):
        checkpoint.save(manager, state, step, {"epoch": 0}, {**meta, "samples_seen": step})
    manager.wait_until_finished()
    manager.close()
    (epath.Path(checkpoint.step_path(directory, 2)) / disk_watchdog.COMMIT_FILE).unlink()
    assert checkpoint.find_checkpoint_step(directory) == (directory, 1)
    assert checkpoint.find_checkpoint_step(checkpoint.step_path(directory, 1)) == (directory, 1)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.find_checkpoint_step(checkpoint.step_path(directory, 2))
    assert checkpoint.load_checkpoint(directory)["step"] == 1
    with pytest.raises(checkpoint.CheckpointError, match="not a committed checkpoint"):
        checkpoint.export_weights(directory, 2)  # the weights-only export too reads committed steps only
    checkpoint.export_weights(directory, 1)
    exported = checkpoint.load_checkpoint_file(checkpoint.export_path(directory, 1))
    assert exported["step"] == 1 and exported["params"]["w"].tolist() == [[1.0] * 4] * 4
    assert not epath.Path(checkpoint.export_path(directory, 2)).exists()
    reopened = checkpoint.manager(directory)
    assert reopened.all_steps() == [1]  # what the training restore chooses from
    reopened.close()

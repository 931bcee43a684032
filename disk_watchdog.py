"""Keep a TPU worker's disks from filling up during a training run.

    python disk_watchdog.py --paths /mnt/disk/run /mnt/disk/hf --min-free-gb 20 --keep-checkpoints 2
    python disk_watchdog.py --paths runs/echo --once --dry-run      # what would go, deleting nothing

Runs beside the trainer on every worker (launch.sh starts it). When free space on a watched
filesystem drops below --min-free-gb, it frees space in this order, stopping as soon as there is
enough again:
  1. Hugging Face Hub cache entries (least recently used first), through huggingface_hub's cache API;
  2. shard downloads the data pipeline is done with (`*.tar` in its `echo-shards-*` scratch
     directories that no process holds open: the pipeline holds every shard it still needs);
  3. leftovers of interrupted saves: orbax's `step_XXXXXXX.orbax-checkpoint-tmp*` directories, temporary
     `.step_*.tmp` files, and checkpoints the trainer set aside as unreadable (`step_XXXXXXX.unreadable-*`),
     once nothing in them has changed for 10 minutes and no process has them open;
  4. checkpoints beyond the newest --keep-checkpoints complete ones: orbax's `step_XXXXXXX/` directories
     and the seed's `step_XXXXXXX.pkl` files, each with its weights-only `.params.pkl`.
It never deletes the newest complete checkpoint, one still being written, a file some process has
open, anything outside the roots, or anything reached through a symlink. Every deletion is a JSON
line on stdout. Below --critical-gb with nothing left to delete, it appends an event to the run's
metrics file so that the dashboard shows it.
"""

import argparse
import fcntl
import json
import os
import re
import shutil
import sys
import time

# train_pretrain.py's complete checkpoints: orbax step directories, or the seed's pickles.
CHECKPOINT_RE = re.compile(r"^step_(\d{7})(\.pkl)?$")
COMMIT_FILE = "commit_success.txt"  # orbax's mark of a step directory whose every host finished writing
LEFTOVER_RE = re.compile(r"^(step_\d{7}\.orbax-checkpoint-tmp.*|step_\d{7}\.unreadable-.*|\.step_\d{7}.*\.tmp)$")
LEFTOVER_AGE_S = 600  # a save under way changes its files well within this
SCRATCH_PREFIX = "echo-shards-"  # data.py's per-host shard download directories
GB = 1024 ** 3
MAX_DEPTH = 6  # how deep under a root the watchdog looks


def log(**fields):
    print(json.dumps({"time": round(time.time(), 3), **fields}), flush=True)


class Watchdog:
    def __init__(self, roots, min_free_gb, critical_gb, keep_checkpoints, dry_run, metrics_file):
        self.roots = [os.path.realpath(r) for r in roots]
        self.min_free = min_free_gb * GB
        self.critical = critical_gb * GB
        self.keep = max(1, keep_checkpoints)  # the newest complete checkpoint always stays
        self.dry_run = dry_run
        self.metrics_file = metrics_file
        self.deleted = set()  # (path, bytes, device) deleted this pass: a dry run counts them as freed
        self.alerted = set()  # roots whose critical state the dashboard was told of

    # -- where things are
    def inside_roots(self, path):
        """True when `path`, with every symlink resolved, lies inside a root (and is no symlink itself)."""
        if os.path.islink(path):
            return False
        real = os.path.realpath(path)
        return any(real == r or real.startswith(r + os.sep) for r in self.roots)

    def walk(self, root):
        """Directories under a root, without following symlinks, at most MAX_DEPTH deep."""
        base = root.rstrip(os.sep).count(os.sep)
        for directory, subdirs, files in os.walk(root, followlinks=False):
            if directory.count(os.sep) - base >= MAX_DEPTH:
                subdirs[:] = []
            subdirs[:] = [d for d in subdirs if not os.path.islink(os.path.join(directory, d))]
            yield directory, subdirs, files

    @staticmethod
    def open_files():
        """Real paths of every file some process on this machine has open."""
        opened = set()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            fd_dir = f"/proc/{pid}/fd"
            try:
                for fd in os.listdir(fd_dir):
                    try:
                        opened.add(os.path.realpath(os.readlink(os.path.join(fd_dir, fd))))
                    except OSError:
                        pass
            except OSError:
                pass
        return opened

    # -- candidates, in the order they go
    def hub_caches(self):
        """Hub cache directories in the roots: they hold models--* / datasets--* repo folders."""
        found = []
        for root in self.roots:
            for directory, subdirs, _ in self.walk(root):
                if any(d.startswith(("models--", "datasets--", "spaces--")) for d in subdirs):
                    if self.inside_roots(directory):
                        found.append(directory)
                    subdirs[:] = []
        return found

    def shard_downloads(self, opened):
        found = []
        for root in self.roots:
            for directory, _, files in self.walk(root):
                if not os.path.basename(directory).startswith(SCRATCH_PREFIX):
                    continue
                for name in files:
                    path = os.path.join(directory, name)
                    if name.endswith(".tar") and self.inside_roots(path) and os.path.realpath(path) not in opened:
                        found.append(path)
        return sorted(found, key=lambda p: os.lstat(p).st_mtime)

    def leftovers(self, opened):
        """Temporary files and directories of interrupted saves, and set-aside unreadable checkpoints,
        untouched for LEFTOVER_AGE_S and not open, oldest first."""
        found = []
        for root in self.roots:
            for directory, subdirs, files in self.walk(root):
                for name in subdirs + files:
                    path = os.path.join(directory, name)
                    if LEFTOVER_RE.match(name) and self.inside_roots(path) and not self.in_use(path, opened):
                        found.append(path)
                subdirs[:] = [d for d in subdirs if not LEFTOVER_RE.match(d)]
        return sorted(found, key=lambda p: os.lstat(p).st_mtime)

    def old_checkpoints(self, opened):
        """[(step, [paths])] of checkpoints beyond the newest `keep` complete ones (a pickle, or a step
        directory orbax has committed), oldest first."""
        found = []
        for root in self.roots:
            for directory, subdirs, files in self.walk(root):
                whole = [m for m in map(CHECKPOINT_RE.match, subdirs + files)
                         if m and (m.group(2) or os.path.isfile(os.path.join(directory, m.group(0), COMMIT_FILE)))]
                steps = sorted({int(m.group(1)) for m in whole})
                for step in steps[:-self.keep]:
                    paths = [os.path.join(directory, f"step_{step:07d}{suffix}") for suffix in ("", ".pkl", ".params.pkl")]
                    paths = [p for p in paths if os.path.lexists(p)]
                    if all(self.inside_roots(p) and not self.in_use(p, opened, age=0) for p in paths):
                        found.append((step, paths))
                subdirs[:] = [d for d in subdirs if not CHECKPOINT_RE.match(d)]
        return sorted(found)

    @staticmethod
    def in_use(path, opened, age=LEFTOVER_AGE_S):
        """Open in some process, or (a directory) holding such a file, or changed in the last `age` s."""
        paths = [path]
        if os.path.isdir(path) and not os.path.islink(path):
            paths = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] or [path]
        newest = max(os.lstat(p).st_mtime for p in paths)
        return any(os.path.realpath(p) in opened for p in paths) or time.time() - newest < age

    # -- the pass
    def free_bytes(self, path):
        free = shutil.disk_usage(path).free
        if self.dry_run:  # what the deletions already reported would have freed on this filesystem
            dev = os.stat(path).st_dev
            free += sum(size for p, size, d in self.deleted if d == dev)
        return free

    def delete(self, path, reason):
        """Delete a file or a whole directory (no symlink is followed)."""
        dev = os.lstat(path).st_dev
        if os.path.isdir(path) and not os.path.islink(path):
            size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs)
            if not self.dry_run:
                shutil.rmtree(path)
        else:
            size = os.lstat(path).st_size
            if not self.dry_run:
                os.remove(path)
        self.deleted.add((path, size, dev))
        log(event="deleted" if not self.dry_run else "would_delete", path=path, bytes=size, reason=reason)

    def run_once(self):
        """One pass over every watched filesystem; returns the free bytes per root afterwards."""
        self.deleted = set()
        result = {}
        for root in self.roots:
            if not os.path.isdir(root):
                log(event="error", path=root, error="root does not exist")
                continue
            if self.free_bytes(root) < self.min_free:
                self.clean(root)
            free = self.free_bytes(root)
            result[root] = free
            if free < self.critical:
                log(event="disk_critical", path=root, free_gb=round(free / GB, 2))
                if root not in self.alerted:  # once per episode, not every pass
                    self.alert(root, free)
                    self.alerted.add(root)
            else:
                self.alerted.discard(root)
        return result

    def clean(self, root):
        dev = os.stat(root).st_dev
        same_fs = lambda p: os.lstat(p).st_dev == dev
        enough = lambda: self.free_bytes(root) >= self.min_free
        log(event="low_disk", path=root, free_gb=round(self.free_bytes(root) / GB, 2),
            min_free_gb=round(self.min_free / GB, 2))
        for cache in self.hub_caches():
            if enough():
                return
            if same_fs(cache):
                self.clean_hub_cache(cache, enough)
        opened = self.open_files()
        for path in self.shard_downloads(opened):
            if enough():
                return
            if same_fs(path):
                self.delete(path, "shard download the pipeline is done with")
        for path in self.leftovers(opened):
            if enough():
                return
            if same_fs(path):
                self.delete(path, "leftover of an interrupted or unreadable checkpoint")
        for step, paths in self.old_checkpoints(opened):
            if enough():
                return
            if same_fs(paths[0]):
                for path in paths:
                    self.delete(path, f"checkpoint beyond the newest {self.keep}")

    def clean_hub_cache(self, cache, enough):
        from huggingface_hub import scan_cache_dir  # only on a machine that has a Hub cache to clean

        info = scan_cache_dir(cache)
        for repo in sorted(info.repos, key=lambda r: r.last_accessed):
            for revision in sorted(repo.revisions, key=lambda r: r.last_modified):
                if enough():
                    return
                strategy = info.delete_revisions(revision.commit_hash)
                log(event="deleted" if not self.dry_run else "would_delete", path=str(revision.snapshot_path),
                    bytes=strategy.expected_freed_size, reason=f"Hub cache: {repo.repo_type} {repo.repo_id}")
                if self.dry_run:
                    self.deleted.add((str(revision.snapshot_path), strategy.expected_freed_size, os.stat(cache).st_dev))
                else:
                    strategy.execute()

    def alert(self, root, free):
        """Tell the dashboard: an event line in the run's metrics file."""
        if not self.metrics_file:
            return
        line = {"event": "disk_critical", "time": time.time(), "path": root, "free_gb": round(free / GB, 2),
                "message": f"{free / GB:.1f} GB free on {root} and nothing left that the watchdog may delete"}
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(line) + "\n")


def take_lock(path):
    """An exclusive lock held for the process's life: a second watchdog on this machine exits."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", nargs="+", required=True, metavar="ROOT", help="the only directories it may delete in")
    p.add_argument("--min-free-gb", type=float, default=20.0, help="clean when free space drops below this")
    p.add_argument("--critical-gb", type=float, default=None, help="alert the dashboard below this when nothing "
                   "is left to delete (default: a quarter of --min-free-gb)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between passes")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept per directory (>= 1)")
    p.add_argument("--metrics-file", default=None, help="the run's metrics.jsonl, for the critical-disk event")
    p.add_argument("--lock-file", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "echo_disk_watchdog.lock"),
                   help="one watchdog per machine holds this lock")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted; delete nothing")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    missing = [p for p in args.paths if not os.path.isdir(p)]
    if missing:
        print(f"disk_watchdog.py: error: {', '.join(missing)} is not a directory", file=sys.stderr)
        return 2
    if args.min_free_gb < 0 or args.interval <= 0:
        print("disk_watchdog.py: error: --min-free-gb must be >= 0 and --interval positive", file=sys.stderr)
        return 2
    lock = take_lock(args.lock_file)
    if lock is None:
        print(f"disk_watchdog.py: another watchdog holds {args.lock_file}; exiting", file=sys.stderr)
        return 1
    critical = args.critical_gb if args.critical_gb is not None else args.min_free_gb / 4
    dog = Watchdog(args.paths, args.min_free_gb, critical, args.keep_checkpoints, args.dry_run, args.metrics_file)
    log(event="watchdog_started", roots=dog.roots, min_free_gb=args.min_free_gb, dry_run=args.dry_run)
    while True:
        try:
            dog.run_once()
        except Exception as e:  # its own errors never stop it: the next pass tries again
            log(event="error", error=f"{type(e).__name__}: {e}")
        if args.once:
            return 0
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())

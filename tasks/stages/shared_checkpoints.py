"""A training's checkpoints in the shared store (`run.store`), so that a training killed on one machine resumes on
another. Each checkpoint the child reports is uploaded behind the training (its manifest last: it counts only when
whole), and only the newest is kept there; a machine that starts the training downloads the newest one and every
sample weights folder before the child starts, and the child resumes from it as from its own."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tasks.core.atomic import atomic_folder
from tasks.core.faults import hold_if_injected, kill_if_injected
from tasks.core.progress import run_logger
from tasks.core.remote import Remote
from tasks.core.store import RemoteDamage, RemoteError
from tasks.training.checkpoints import complete_checkpoints

SAMPLES = "samples/"  # sample weights: every one is kept, for the checkpoint samples of the report


def fetch_checkpoints(remote: Remote, key: str, folder: Path) -> None:
    """Into the checkpoints folder `folder`: the store's newest checkpoint when it is newer than this machine's, and
    the sample weights this machine lacks. One that does not download whole is not used (said in one log line)."""
    held = remote.checkpoints(key)
    steps = [name for name in held if not name.startswith(SAMPLES)]
    mine = [path.name for path in complete_checkpoints(folder)]
    wanted = [name for name in held if name.startswith(SAMPLES) and not (folder / name).is_dir()]
    if steps and (not mine or steps[-1] > mine[-1]):
        wanted.append(steps[-1])
    for name in wanted:
        try:
            with atomic_folder(folder / name, replace=True) as partial:
                remote.download("train-checkpoint", key, held[name], partial)
        except RemoteDamage as damage:
            run_logger().warning("checkpoint %s of train/%s in the shared store is not used: %s", name, key, damage)
            continue
        run_logger().info("checkpoint %s of train/%s downloaded from the shared store", name, key)


class Uploads:
    """Checkpoints copied to the shared store one at a time while training goes on; a failed upload is said in one
    log line and leaves that checkpoint on this machine only."""

    def __init__(self, remote: Remote, key: str, folder: Path) -> None:
        self.remote, self.key, self.folder = remote, key, folder
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self.pending: list[Future] = []

    def add(self, name: str) -> None:
        self.pending.append(self.executor.submit(self._put, name))

    def _put(self, name: str) -> None:
        path = self.folder / name
        try:
            self.remote.put_checkpoint(self.key, name, path)
            if not name.startswith(SAMPLES):  # one checkpoint to resume from is enough
                older = [held for held in self.remote.checkpoints(self.key) if not held.startswith(SAMPLES)]
                self.remote.drop_checkpoints(self.key, [held for held in older if held < name])
            kill_if_injected(f"train:uploaded-{name}")
            hold_if_injected(f"train:uploaded-{name}")
        except (OSError, RemoteError) as err:
            if path.is_dir():  # else a newer checkpoint replaced it while it was uploaded
                run_logger().warning("checkpoint %s of train/%s is only on this machine: %s", name, self.key, err)

    def close(self) -> None:
        """Wait for the uploads in flight."""
        self.executor.shutdown(wait=True)
        for done in self.pending:
            done.result()

"""A job's artifacts: the store named by `spec.store.uri` and the job's keys inside it (`jobs/<ns>/<job>/...`)."""

from __future__ import annotations

from dataclasses import dataclass

from tessera.api import FineTuneJob, paths
from tessera.store import Store, join_key, open_store


@dataclass(frozen=True)
class JobArtifacts:
    """`spec.store.uri` opened once; `key()` turns the API's relative keys into store keys."""

    store: Store
    root: str
    job: FineTuneJob

    @classmethod
    def open(cls, job: FineTuneJob) -> JobArtifacts:
        store, root = open_store(job.spec.store.uri)
        return cls(store, root, job)

    def key(self, relative: str) -> str:
        return join_key(self.root, relative)

    def uri(self, relative: str) -> str:
        return self.store.uri(self.key(relative))

    def checkpoint(self, step: int) -> str:
        """Relative key of the checkpoint written after optimizer step `step`."""
        return f"{paths.checkpoints_prefix(self.job)}/step-{step}"

    def checkpoint_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending (an interrupted publish does not count)."""
        prefix = self.key(paths.checkpoints_prefix(self.job))
        if not self.store.exists(prefix):
            return []
        steps = []
        for child in self.store.list(prefix, recursive=False):
            name = child.rstrip("/").rsplit("/", 1)[-1]
            number = name.removeprefix("step-")
            if name.startswith("step-") and number.isdigit() and self.store.is_published(child.rstrip("/")):
                steps.append(int(number))
        return sorted(steps)

"""What a stage's code is given: its settings view, its inputs, and run-time resources that cannot change
its output. Every layer that runs a stage reads this module (it imports only config and storage).

``StageContext.settings`` is the stage's view (rlhf_core/config/views.py), the exact object its cache key
hashes; there is no way from here to the rest of the config. The run-time resources are named as such:
the store the output goes to, how many checkpoints to keep (``storage``), the process group (``dist``) and
the lineage recorded in the manifest (``producer``), where curves go besides the store (``logging``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from rlhf_core.config import LoggingConfig, StorageConfig
from rlhf_core.config.schema import Section
from rlhf_core.storage.store import Manifest, OutputWriter, Store

if TYPE_CHECKING:  # torch is imported where a device is made: `rlhf run` of a cached pipeline never needs it
    import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: str = "cpu") -> "DistInfo":
        """One process without torch.distributed (stages that run inside their task)."""
        import torch

        return cls(0, 0, 1, torch.device(device))


@dataclass
class StageContext:
    stage: str
    version: int
    key: str
    settings: Any  # the stage's settings view (a frozen Section)
    upstream: dict[str, Manifest]
    store: Store  # run-time: where the output goes
    storage: StorageConfig  # run-time: checkpoints kept, leases
    dist: DistInfo  # run-time: this process's place in the group
    producer: dict[str, Any] = field(default_factory=dict)  # run-time: lineage for the manifest
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # run-time: curves besides the store (wandb)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[{self.stage}] {msg}", flush=True)

    def fetch(self, stage: str, rel: str) -> str:
        """A local path of ``rel`` in an input's output (downloaded once from a remote store)."""
        m = self.upstream[stage]
        return self.store.fetch(m.stage, m.key, rel)

    def commit(self, out: OutputWriter, metrics: dict[str, Any]) -> Manifest:
        """Write the manifest last: the settings view as the config, the inputs, the metrics, the lineage."""
        settings: Section = self.settings
        if self.dist.device.type == "cuda":  # a run-time fact, so the manifest's, never an output file's
            import torch

            metrics = {**metrics, "peak_device_gib": round(torch.cuda.max_memory_allocated(self.dist.device) / 2**30, 2)}
        return out.commit(stage_version=self.version, config=settings.model_dump(mode="json"), upstream=self.upstream,
                          metrics=metrics, producer=self.producer)

    def write_output(self, write: Callable[[str], None], metrics: dict[str, Any]) -> Manifest:
        """The one save sequence of the stages that write files: ``write(folder)`` puts the output's files
        into a local folder (and may add to ``metrics``), every file goes into the store output, then the
        manifest."""
        with tempfile.TemporaryDirectory(prefix=f"rlhf-{self.stage}-") as tmp:
            write(tmp)
            with self.store.open_output(self.stage, self.key) as out:
                out.put_dir(tmp, "")
                return self.commit(out, metrics)

"""A run's life, decided in one place: new, resume, extend, finished or conflict.

A run directory records the settings that decide its weights (its training state's
`run_config`). Asked to train into it again, `decide` compares them with the settings asked
for now. The Trainer (which refuses a conflict), `runs.prepare` (which refuses it or starts
over, as its caller says) and so the CLI and the pipeline all go through `decide`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["new", "resume", "extend", "finished", "conflict"]
# What only grows when a finished run is extended: a larger budget tokenizes as many chunks
# or more, and RowOrder's first epoch is a prefix, so the run ends where one longer run would.
EXTENSION_KEYS = frozenset({"max_tokens", "n_chunks"})
# Identity of the data, recorded beside the weights' settings (absent from older states).
DATA_KEYS = ("model_name", "dataset", "text_field", "test_fraction", "split_seed")


@dataclass(frozen=True)
class Plan:
    """What training into a run directory does, and the settings that changed (dotted name
    -> (recorded, asked))."""

    action: Action
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def describe(self) -> list[str]:
        return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in self.changes.items()]

    def refusal(self, out_dir: Any) -> str:
        if "inputs" in self.changes:  # the tuned lens's fingerprint (None: plain activations)
            held, now = (str(v)[:12] for v in self.changes["inputs"])
            return (
                f"{out_dir} holds a run trained through another tuned lens (inputs fingerprint "
                f"{held}, now {now}); rerun with that lens to resume, or use another --out "
                "directory"
            )
        return (
            f"{out_dir} holds a run with other settings ({'; '.join(self.describe())}); rerun "
            "with the same settings to resume (or only a larger --max_tokens to extend it), or "
            "use another --out directory"
        )


def run_settings(
    sae: dict[str, Any],
    train: dict[str, Any],
    precision: str,
    *,
    batch_size: int,
    max_length: int,
    max_tokens: int,
    world_size: int,
    inputs: str | None,
    data: dict[str, Any] | None = None,
    n_chunks: int | None = None,
) -> dict[str, Any]:
    """The settings that decide a run's weights, as state.json records them: the train
    settings with `precision` resolved (checkpoint_every, nproc_per_node and device are not the
    weights'; the world size is, and a run may resume on another device in its precision), the
    batch shape and budget, the tuned lens's fingerprint (`inputs`), the data's identity and,
    once tokenized, n_chunks."""
    skip = ("checkpoint_every", "nproc_per_node", "device")
    kept = {k: v for k, v in train.items() if k not in skip}
    config: dict[str, Any] = {"sae": sae, "train": {**kept, "precision": precision}}
    config.update(batch_size=batch_size, max_length=max_length, max_tokens=max_tokens,
                  world_size=world_size)  # fmt: skip
    if n_chunks is not None:
        config["n_chunks"] = n_chunks
    config["inputs"] = inputs
    if data:
        config["data"] = {k: data[k] for k in DATA_KEYS if k in data}
    return config


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sae': {'k': 4}} -> {'sae.k': 4}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def decide(
    recorded: dict[str, Any] | None,
    asked: dict[str, Any],
    done: bool = False,
    also_changed: dict[str, tuple[Any, Any]] | None = None,
) -> Plan:
    """The plan for a directory recording `recorded` (None: nothing trained yet) and the
    settings `asked` for now. A setting either side does not record cannot conflict (older
    states, or n_chunks before tokenizing). Only a larger token budget extends a run;
    `also_changed` (e.g. a damaged checkpoint or a new code version) always conflicts."""
    if recorded is None:
        return Plan("new")
    old, new = flat(recorded), flat(asked)
    changes = {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k]}
    if also_changed:
        return Plan("conflict", {**changes, **also_changed})
    if not changes:
        return Plan("finished" if done else "resume")
    chunks = new.get("n_chunks", old.get("n_chunks", 0))  # unknown before tokenizing
    grows = new["max_tokens"] > old["max_tokens"] and chunks >= old.get("n_chunks", 0)
    return Plan("extend" if set(changes) <= EXTENSION_KEYS and grows else "conflict", changes)

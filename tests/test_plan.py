"""A run's life decided in one place (mlsae_core.plan.decide), on hand-written records."""

from mlsae_core.plan import Plan, decide, run_settings

SAE = {"expansion_factor": 2, "k": 4}
TRAIN = {"lr": 1e-3, "seed": 0, "precision": "auto", "checkpoint_every": 10, "device": "cpu"}
DATA = {"model_name": "tiny-llama", "dataset": "tiny-text", "split_seed": 0}


def settings(max_tokens: int = 1024, n_chunks: int | None = 32, lr: float = 1e-3, **data):
    return run_settings(
        SAE, {**TRAIN, "lr": lr}, "float32", batch_size=2, max_length=32, max_tokens=max_tokens,
        world_size=1, inputs=None, data={**DATA, **data}, n_chunks=n_chunks,
    )  # fmt: skip


def test_the_five_outcomes():
    saved = settings()
    assert decide(None, settings()) == Plan("new")
    assert decide(saved, settings()) == Plan("resume")
    assert decide(saved, settings(), done=True) == Plan("finished")
    grown = decide(saved, settings(2048, 64), done=True)
    assert grown.action == "extend"
    assert grown.describe() == ["max_tokens: 1024 -> 2048", "n_chunks: 32 -> 64"]
    other = decide(saved, settings(lr=2e-3), done=True)
    assert other == Plan("conflict", {"train.lr": (1e-3, 2e-3)})
    assert "train.lr: 0.001 -> 0.002" in other.refusal("runs/x")


def test_extension_rules():
    saved = settings()
    # a smaller budget, or fewer chunks for a larger one, is not an extension
    assert decide(saved, settings(512, 16)).action == "conflict"
    assert decide(saved, settings(2048, 16)).action == "conflict"
    # before tokenizing n_chunks is unknown: the budget alone decides
    assert decide(saved, settings(2048, None)).action == "extend"
    # a larger budget with another setting changed restarts
    assert decide(saved, settings(2048, 64, lr=2e-3)).action == "conflict"


def test_data_identity_and_forced_conflicts():
    saved = settings()
    assert decide(saved, settings(dataset="brown")).changes == {
        "data.dataset": ("tiny-text", "brown")
    }
    # checkpoint_every and device are not the weights' settings: they never conflict
    assert not {"checkpoint_every", "device"} & set(settings()["train"])
    # an older state that does not record a setting cannot conflict on it
    older = {k: v for k, v in saved.items() if k != "data"}
    assert decide(older, settings(dataset="brown")).action == "resume"
    # what the caller knows changed (a new code version, a damaged checkpoint) always conflicts
    forced = decide(saved, settings(), True, {"code_version": ("3", "4")})
    assert forced == Plan("conflict", {"code_version": ("3", "4")})

"""An on-disk activation cache, so a sweep of MLSAEs shares one pass of the transformer.

`build` writes the block outputs as memory-mapped float16 shards (`[n_layers, shard_rows, pos,
d]`) and `cache.json` (model fingerprint, layers, tokens hash, shapes, the forward's precision),
all recorded in the manifest, in a directory that appears atomically. `open` refuses a cache
whose `cache.json` mismatches what it is given (naming the field) or whose files fail
`atomic.verify`, so `open_or_build` rebuilds it. The reader is a `train.ActivationSource`.

The forward runs in the precision of the runs it serves, so a cached run sees what a live one
would, to float16 rounding (relative error <= 2^-11; values beyond 65504 are refused). float16's
11-bit significand adds less error than a bf16 forward has, at half float32's disk and bandwidth.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlsae_core import atomic
from mlsae_core.precision import autocast, dtype_name

logger = logging.getLogger(__name__)

INFO_NAME = "cache.json"  # which activations (identity), not whether the bytes are intact
FORMAT = "mlsae-activation-cache"
VERSION = 3
FP16_MAX = 65504.0


class CacheMismatchError(ValueError):
    """The cache was built from another model, other tokens or other layers (or is broken)."""


class CacheCorruptError(CacheMismatchError):
    """A file of the cache does not match its manifest: truncated, modified or unrecorded."""


def tokens_digest(tokens: torch.Tensor) -> str:
    """sha256 of the token ids as little-endian int64, with their shape."""
    arr = np.ascontiguousarray(tokens.detach().cpu().numpy().astype("<i8"))
    h = hashlib.sha256(str(tuple(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def model_fingerprint(transformer: Any) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes: same weights <=> same hash."""
    h = hashlib.sha256()
    for name, p in transformer.model.state_dict().items():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ActivationCache:
    """Read side of the cache: an `ActivationSource` over float16 memory-mapped shards."""

    def __init__(self, directory: Path, info: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.layers: list[int] = list(info["layers"])
        self.n_layers = len(self.layers)
        self.index = list(range(self.n_layers))  # the cached layers __call__ reads
        self.d_model = int(info["d_model"])
        self.n_rows = int(info["n_rows"])
        self.pos = int(info["pos"])
        self.shard_rows = int(info["shard_rows"])
        self._shards: list[np.ndarray] = []
        for i, entry in enumerate(info["shards"]):
            path = self.directory / entry["file"]
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise CacheCorruptError(
                    f"cache shard {path} is unreadable ({exc}); rebuild the cache"
                ) from exc
            want = (self.n_layers, entry["rows"], self.pos, self.d_model)
            if arr.shape != want or arr.dtype != np.float16:
                raise CacheMismatchError(
                    f"cache shard {path} has shape {arr.shape} {arr.dtype}, {INFO_NAME} says "
                    f"{want} float16; rebuild the cache"
                )
            if i < len(info["shards"]) - 1 and entry["rows"] != self.shard_rows:
                raise CacheMismatchError(f"cache shard {path}: unexpected row count")
            self._shards.append(arr)

    # ----- ActivationSource ---------------------------------------------------------------
    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """[n_layers, len(rows), pos, d] float32 for chunk rows `rows`."""
        rows_np = np.asarray(torch.as_tensor(rows).reshape(-1).cpu().numpy(), dtype=np.int64)
        if rows_np.size and (rows_np.min() < 0 or rows_np.max() >= self.n_rows):
            raise IndexError(f"rows out of range: the cache holds {self.n_rows} chunks")
        index = np.asarray(self.index)
        out = np.empty((index.size, rows_np.size, self.pos, self.d_model), dtype=np.float32)
        shard_of, offset = np.divmod(rows_np, self.shard_rows)
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            out[:, where] = self._shards[int(s)][np.ix_(index, offset[where])]
        return torch.from_numpy(out)

    def __len__(self) -> int:
        return self.n_rows

    def select(self, layers: Sequence[int]) -> ActivationCache:
        """The cache read at a subset of its layers (e.g. one layer's baseline)."""
        missing = [int(x) for x in layers if int(x) not in self.layers]
        if missing:
            raise CacheMismatchError(
                f"layers {missing} are not in the activation cache {self.directory} "
                f"(it holds {self.layers}); rebuild it with those layers"
            )
        view = copy.copy(self)
        view.index = [self.index[self.layers.index(int(x))] for x in layers]
        view.layers, view.n_layers = [int(x) for x in layers], len(view.index)
        return view

    @classmethod
    def open_or_build(
        cls,
        directory: str | Path,
        transformer: Any,
        tokens: torch.Tensor,
        precision: torch.dtype = torch.float32,
        **build_kw: Any,
    ) -> ActivationCache:
        """Reuse the cache at `directory` if it matches (model, tokens, all layers, the
        forward's precision), else build it."""
        layers = list(range(transformer.n_layers))
        try:
            return cls.open(directory, transformer, tokens, layers, precision=precision)
        except CacheMismatchError as exc:
            log = logger.warning if isinstance(exc, CacheCorruptError) else logger.info
            log("building the activation cache %s (%s)", directory, exc)
            return cls.build(transformer, tokens, layers, directory, precision=precision,
                             **build_kw)  # fmt: skip

    # ----- open / build -------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: str | Path,
        transformer: Any | None = None,
        tokens: torch.Tensor | None = None,
        layers: Sequence[int] | None = None,
        verify: bool = True,
        precision: torch.dtype | None = None,
    ) -> ActivationCache:
        """Open a cache, checking it against whatever of model/tokens/layers is given;
        `cache.json` is always verified against the manifest, the shards when `verify`."""
        directory = Path(directory)
        path = directory / INFO_NAME
        if not path.is_file():
            raise CacheMismatchError(
                f"{path} is missing: {directory} is not a finished activation cache "
                "(build it with ActivationCache.build)"
            )
        _verify(directory, [INFO_NAME])
        info = json.loads(path.read_text())
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise CacheMismatchError(
                f"{path}: format {info.get('format')!r} v{info.get('version')} is not "
                f"{FORMAT!r} v{VERSION}; rebuild the cache"
            )
        expected: dict[str, Any] = {}
        if transformer is not None:
            expected["d_model"] = transformer.d_model
            expected["model_fingerprint"] = model_fingerprint(transformer)
        if tokens is not None:
            expected["n_rows"], expected["pos"] = (int(s) for s in tokens.shape)
            expected["tokens_sha256"] = tokens_digest(tokens)
        if layers is not None:
            expected["layers"] = [int(layer) for layer in layers]
        if precision is not None:
            expected["precision"] = dtype_name(precision)
        for key, want in expected.items():
            if info.get(key) != want:
                raise CacheMismatchError(
                    f"activation cache {directory} was built with {key}={info.get(key)!r} "
                    f"but {want!r} was asked for; build a cache for this model/data/layers "
                    "or point to the right one"
                )
        if verify:  # after the identity checks: a cache of other activations is not hashed
            _verify(directory, [entry["file"] for entry in info["shards"]])
        return cls(directory, info)  # shapes

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        transformer: Any,
        tokens: torch.Tensor,
        layers: Sequence[int] | None,
        out_dir: str | Path,
        shard_rows: int = 64,
        batch_size: int = 4,
        progress: bool = True,
        precision: torch.dtype = torch.float32,
    ) -> ActivationCache:
        """Run `transformer` over `tokens` [n_rows, pos] once (in `precision`, as training's
        live forward would); write shards, manifest last."""
        from tqdm.auto import tqdm

        if shard_rows < 1 or batch_size < 1:
            raise ValueError("shard_rows and batch_size must be >= 1")
        layers = list(range(transformer.n_layers)) if layers is None else [int(x) for x in layers]
        n_rows, pos = (int(s) for s in tokens.shape)
        d = transformer.d_model
        out_dir = Path(out_dir)
        shards = []
        with atomic.atomic_dir(out_dir) as tmp:
            bar = tqdm(
                total=n_rows * pos,
                unit="tok",
                unit_scale=True,
                disable=not progress,
                desc=f"activation cache {out_dir.name}",
            )
            for i, start in enumerate(range(0, n_rows, shard_rows)):
                stop = min(start + shard_rows, n_rows)
                name = f"shard_{i:05d}.npy"
                arr = np.lib.format.open_memmap(
                    tmp / name,
                    mode="w+",
                    dtype=np.float16,
                    shape=(len(layers), stop - start, pos, d),
                )
                for a in range(start, stop, batch_size):
                    b = min(a + batch_size, stop)
                    with autocast(transformer.device, precision):
                        acts = transformer.activations(tokens[a:b], layers)
                    acts = acts.float()  # [L, b, P, d]
                    if not torch.isfinite(acts).all() or acts.abs().max() > FP16_MAX:
                        raise ValueError(
                            f"activations of rows {a}..{b} are non-finite or beyond float16's "
                            f"range ({FP16_MAX}); a float16 cache cannot hold them"
                        )
                    arr[:, a - start : b - start] = acts.cpu().numpy().astype(np.float16)
                    bar.update((b - a) * pos)
                arr.flush()
                del arr
                shards.append({"file": name, "rows": stop - start})
            bar.close()
            info = {
                "format": FORMAT,
                "version": VERSION,
                "model_name": transformer.name,
                "model_fingerprint": model_fingerprint(transformer),
                "layers": layers,
                "d_model": d,
                "n_rows": n_rows,
                "pos": pos,
                "tokens_sha256": tokens_digest(tokens),
                "dtype": "float16",
                "precision": dtype_name(precision),
                "shard_rows": shard_rows,
                "shards": shards,
            }
            atomic.write_json(tmp / INFO_NAME, info)
            atomic.record(tmp, [*(s["file"] for s in shards), INFO_NAME])
        logger.info("activation cache %s: %d rows x %d layers", out_dir, n_rows, len(layers))
        return cls.open(out_dir, verify=False)  # the shards were hashed from disk just now


def _verify(directory: Path, names: list[str]) -> None:
    """`atomic.verify`, as the CacheCorruptError that makes `open_or_build` rebuild."""
    try:
        atomic.verify(directory, names)
    except atomic.CorruptFileError as exc:
        raise CacheCorruptError(str(exc)) from exc

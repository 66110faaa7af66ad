"""A real, multilingual demo corpus, fetched once from Debian's package archive.

The demo gives each participant one language, so the federation is non-IID by design and
the shared model has something to gain from every member. The text is the fortune-cookie
collections Debian packages per language -- real prose written by people: quotations,
proverbs, anecdotes, jokes, recipes, poems:

========  =================================  ========================================
language  Debian packages                    license (see docs/data.md)
========  =================================  ========================================
``en``    ``fortunes``, ``fortunes-min``     BSD (fortune-mod)
``de``    ``fortunes-de``                    GPL-2+
``es``    ``fortunes-es``                    quotations presumed public domain
``it``    ``fortunes-it``                    not copyrighted (collection of quotations)
========  =================================  ========================================

:func:`prepare_demo_corpus` downloads the ``.deb`` files with ``apt-get download`` (no
installation, no root needed once the package lists exist) into
``~/.cache/tapestry/corpus`` (``$TAPESTRY_CACHE`` overrides ``~/.cache/tapestry``), reads
them with ``dpkg-deb --fsys-tarfile`` without unpacking anything onto the system, drops
offensive sections and ASCII art, undoes terminal overstrike, and writes one ``.txt`` per
fortune file into ``dest_dir/<language>/``. Nothing is committed to the repository and
nothing is fetched at training time; every call after the first is a cache hit.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from tapestry_protocol.files import move_into_place, replace_dir

PACKAGES: dict[str, tuple[str, ...]] = {
    "en": ("fortunes", "fortunes-min"),
    "de": ("fortunes-de",),
    "es": ("fortunes-es",),
    "it": ("fortunes-it",),
}
_FORTUNE_ROOT = PurePosixPath("usr/share/games/fortunes")
_SKIP_NAMES = {"asciiart", "ascii-art", "banner"}  # pictures, not language
_COMPLETE = ".complete.json"
_VERSION = 1


class CorpusUnavailable(RuntimeError):
    """The Debian tools or archive cannot be reached; the message says what to run."""


def cache_dir() -> Path:
    root = os.environ.get("TAPESTRY_CACHE") or Path.home() / ".cache" / "tapestry"
    return Path(root) / "corpus"


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError as err:
        raise CorpusUnavailable(
            f"{cmd[0]} not found: the demo corpus comes from Debian packages and needs "
            "apt-get and dpkg-deb (any Debian or Ubuntu machine or image)"
        ) from err


def _download(package: str, debs: Path) -> Path:
    """``apt-get download`` into ``debs`` (once); refresh the package lists if needed."""
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    debs.mkdir(parents=True, exist_ok=True)
    # Downloaded aside and moved in whole, so an interrupted download is never taken for a
    # package on the next run.
    with tempfile.TemporaryDirectory(prefix=".download.", dir=debs) as scratch:
        result = _run(["apt-get", "download", "-q", package], cwd=Path(scratch))
        if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            _run(["apt-get", "update", "-q"])  # a fresh machine has no package lists yet
            result = _run(["apt-get", "download", "-q", package], cwd=Path(scratch))
        if result.returncode == 0:
            for deb in Path(scratch).glob(f"{package}_*.deb"):
                move_into_place(deb, debs / deb.name)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not found:
        reason = result.stderr.decode(errors="replace").strip()[-300:]
        raise CorpusUnavailable(
            f"apt-get download {package} failed ({reason}); run `apt-get update` and retry"
        )
    return found[-1]


def _fortune_files(deb: Path) -> list[tuple[str, bytes]]:
    """(name, raw bytes) of the non-offensive text fortune files inside a ``.deb``."""
    result = _run(["dpkg-deb", "--fsys-tarfile", str(deb)])
    if result.returncode != 0:
        raise CorpusUnavailable(f"dpkg-deb cannot read {deb}: {result.stderr.decode()[-300:]}")
    out = []
    with tarfile.open(fileobj=io.BytesIO(result.stdout), mode="r:") as tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name.removeprefix("./"))
            if not member.isfile() or not path.is_relative_to(_FORTUNE_ROOT):
                continue
            parts = path.relative_to(_FORTUNE_ROOT).parts
            if "off" in parts or path.suffix in (".dat", ".u8") or path.name in _SKIP_NAMES:
                continue
            fh = tar.extractfile(member)
            if fh is not None:
                out.append(("-".join(parts), fh.read()))
    return out


_OVERSTRIKE = re.compile(r".\x08")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SEPARATOR = re.compile(r"^%+\s*$", re.MULTILINE)


def clean_fortunes(raw: bytes) -> str:
    """Fortune-file bytes to plain text: one entry per paragraph, no terminal tricks."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = _ANSI.sub("", _OVERSTRIKE.sub("", text.replace("\r\n", "\n")))
    text = _CONTROL.sub("", text.replace("\t", "  "))
    entries = []
    for entry in _SEPARATOR.split(text):
        lines = [line.rstrip() for line in entry.strip("\n").split("\n")]
        if any(lines):
            entries.append("\n".join(lines).strip("\n"))
    return "\n\n".join(entries) + "\n" if entries else ""


def _build_language(language: str, target: Path) -> dict[str, str]:
    debs = cache_dir() / "debs"
    sources = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{language}.", dir=target.parent))
    try:
        for package in PACKAGES[language]:
            deb = _download(package, debs)
            sources[package] = deb.name
            for name, raw in _fortune_files(deb):
                text = clean_fortunes(raw)
                if text:
                    (tmp / f"{package}-{name}.txt").write_text(text, encoding="utf-8")
        (tmp / _COMPLETE).write_text(
            json.dumps({"version": _VERSION, "language": language, "packages": sources}, indent=2)
        )
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sources


def _is_complete(folder: Path, language: str) -> bool:
    marker = folder / _COMPLETE
    if not marker.is_file():
        return False
    meta = json.loads(marker.read_text())
    return bool(meta.get("version") == _VERSION and meta.get("language") == language)


def prepare_demo_corpus(
    dest_dir: Path | str, languages: Sequence[str] = tuple(PACKAGES)
) -> dict[str, Path]:
    """One folder of ``*.txt`` per language under ``dest_dir``; cached and idempotent.

    The cleaned text is built once in the cache and copied to ``dest_dir``; a folder that
    is already complete is left alone. Returns ``{language: folder}``.
    """
    unknown = sorted(set(languages) - set(PACKAGES))
    if unknown:
        raise ValueError(f"no demo corpus for {unknown}; available: {sorted(PACKAGES)}")
    dest = Path(dest_dir)
    text_cache = cache_dir() / "text"
    text_cache.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    folders = {}
    for language in languages:
        cached = text_cache / language
        if not _is_complete(cached, language):
            _build_language(language, cached)
        folder = dest / language
        if folder.resolve() != cached.resolve() and not _is_complete(folder, language):
            tmp = Path(tempfile.mkdtemp(prefix=f".{language}.", dir=dest))
            try:
                shutil.copytree(cached, tmp, dirs_exist_ok=True)
                replace_dir(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        folders[language] = folder
    return folders


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tapestry_trainer.corpus DEST``: fetch and clean the demo corpus."""
    parser = argparse.ArgumentParser(
        prog="python -m tapestry_trainer.corpus", description=main.__doc__
    )
    parser.add_argument("dest", type=Path)
    parser.add_argument("--languages", nargs="+", default=list(PACKAGES))
    args = parser.parse_args(argv)
    folders = prepare_demo_corpus(args.dest, args.languages)
    sizes = {lang: sum(p.stat().st_size for p in f.glob("*.txt")) for lang, f in folders.items()}
    print(
        json.dumps(
            {lang: {"path": str(f), "bytes": sizes[lang]} for lang, f in folders.items()}, indent=2
        )
    )


if __name__ == "__main__":
    main()

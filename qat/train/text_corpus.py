"""``python -m qat.train.text_corpus [--out DIR] [--html DIR]``: the English text corpus of `data=pydoc`.

Built offline from Debian's ``python3.11-doc`` package (the Python 3.11 documentation as HTML):
  - where: ``--html DIR`` if given; else the installed ``/usr/share/doc/python3.11/html``; else
    ``apt-get download python3.11-doc`` into a temporary folder (the package registry, no root) and
    ``dpkg-deb -x``. When none of these works: one line naming what failed, exit status 2.
  - which pages: every ``*.html`` below the html folder, except the generated index pages
    (``genindex*.html``, ``py-modindex.html``, ``search.html``, ``contents.html``) and folders whose
    name starts with ``_`` (sources, static files, images).
  - text: ``HtmlText`` (standard library ``html.parser``) keeps only Sphinx's main content,
    ``<div class="body" role="main">``: navigation, sidebars, headers, footers, scripts and styles
    are outside it or dropped, and so are the permalink marks (``a.headerlink``, the pilcrow).
    Block elements end a paragraph (one blank line between paragraphs); inside ``<pre>`` (code
    blocks, doctests) the text is kept verbatim, elsewhere runs of white space become one space.
  - split (fixed, independent of any seed): the pages sorted by their path relative to the html
    folder; page i (0-based) goes to validation when i % 10 == 4, to test when i % 10 == 9, else to
    train (80 / 10 / 10 % of the pages). Empty pages are dropped before numbering.
  - files: ``train.txt``, ``val.txt``, ``test.txt`` (UTF-8; the pages of a split joined with one
    blank line, in sorted order) and ``manifest.json`` (source package and version, the rule above,
    per split the page count, bytes and sha256, and the page list), each written to a temporary
    file and renamed into place.

Default output: ``<data root>/pydoc`` (``data.root`` of ``configs/data/pydoc.yaml``: env QAT_DATA,
else ``./data``, which .gitignore excludes), the folder ``data=pydoc`` reads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

PACKAGE = "python3.11-doc"
INSTALLED_HTML = Path("/usr/share/doc/python3.11/html")
HTML_IN_PACKAGE = Path("usr/share/doc/python3.11/html")
SKIPPED_PAGES = re.compile(r"^(genindex.*|py-modindex|search|contents)\.html$")
SPLIT_PERIOD = 10
SPLIT_RULE = {"val": 4, "test": 9}  # page index mod SPLIT_PERIOD -> split; the rest is train
SPLITS = ("train", "val", "test")
BLOCK_TAGS = {"p", "div", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "dl", "ul", "ol", "table",
              "tr", "blockquote", "section", "br", "hr", "figure", "caption", "th"}
DROPPED_TAGS = {"script", "style", "nav", "form", "button", "input", "textarea", "select", "noscript"}
VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "wbr", "col", "area", "base", "source"}


class CorpusError(OSError):
    """The corpus cannot be built (no package, unreadable pages, unwritable output)."""


class HtmlText(HTMLParser):
    """The plain text of a Sphinx page's main content (module docstring). ``text()`` after ``feed``."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []       # open elements, from the main content's div on
        self.dropped_depth = 0           # > 0 inside a dropped element
        self.pre_depth = 0
        self.paragraphs: list[str] = []
        self.current: list[str] = []

    def _in_main(self) -> bool:
        return bool(self.stack)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if not self._in_main():
            if tag == "div" and "body" in classes and attributes.get("role") == "main":
                self.stack.append(tag)
            return
        if tag in VOID_TAGS:
            if tag in ("br", "hr") and not self.dropped_depth and not self.pre_depth:
                self._end_paragraph()
            return
        self.stack.append(tag)
        if self.dropped_depth or tag in DROPPED_TAGS or (tag == "a" and "headerlink" in classes):
            self.dropped_depth += 1
            return
        if tag in BLOCK_TAGS:
            self._end_paragraph(verbatim=self.pre_depth > 0)
        if tag == "pre":
            self.pre_depth += 1

    def handle_endtag(self, tag):
        if not self._in_main() or tag in VOID_TAGS:
            return
        if tag not in self.stack:  # a stray end tag: ignore it
            return
        while self.stack:  # close what the page left open inside this element too
            open_tag = self.stack.pop()
            if self.dropped_depth:
                self.dropped_depth -= 1
            else:
                if open_tag in BLOCK_TAGS:
                    self._end_paragraph(verbatim=self.pre_depth > 0)
                if open_tag == "pre":
                    self.pre_depth -= 1
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._in_main() and not self.dropped_depth:
            self.current.append(data if self.pre_depth else re.sub(r"\s+", " ", data))

    def _end_paragraph(self, verbatim: bool = False):
        """Close the paragraph being collected; `verbatim`: it is (the end of) a code block."""
        text = "".join(self.current)
        self.current = []
        verbatim = verbatim or self.pre_depth > 0
        text = text.strip("\n").rstrip() if verbatim else re.sub(r" +", " ", text).strip()
        if text.strip():
            self.paragraphs.append(text)

    def text(self) -> str:
        self._end_paragraph()
        return "\n\n".join(self.paragraphs)


def html_to_text(html: str) -> str:
    parser = HtmlText()
    parser.feed(html)
    parser.close()
    return parser.text()


def page_paths(html_root: Path) -> list[Path]:
    """The pages of the corpus, relative to `html_root`, sorted by their POSIX path."""
    pages = []
    for path in html_root.rglob("*.html"):
        relative = path.relative_to(html_root)
        if any(part.startswith("_") for part in relative.parts[:-1]) or SKIPPED_PAGES.match(relative.name):
            continue
        pages.append(relative)
    return sorted(pages, key=lambda p: p.as_posix())


def split_of(index: int) -> str:
    """The split of the index-th non-empty page (module docstring)."""
    for split, remainder in SPLIT_RULE.items():
        if index % SPLIT_PERIOD == remainder:
            return split
    return "train"


def build_splits(html_root: Path) -> dict[str, list[tuple[str, str]]]:
    """{split: [(page path, text), ...]} for the pages under `html_root`."""
    texts = []
    for relative in page_paths(html_root):
        text = html_to_text((html_root / relative).read_text(encoding="utf-8", errors="replace"))
        if text.strip():
            texts.append((relative.as_posix(), text))
    splits: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for index, page in enumerate(texts):
        splits[split_of(index)].append(page)
    return splits


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the corpus from other users
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_corpus(html_root: Path, out: Path, source: str) -> dict:
    """Convert, split and write the corpus of `html_root` into `out`; returns the manifest."""
    splits = build_splits(html_root)
    if not splits["train"] or not splits["val"]:
        raise CorpusError(f"{html_root} gave {sum(map(len, splits.values()))} non-empty pages: too few for a "
                          f"train and a validation split; point --html at the python3.11-doc html folder")
    manifest = {"source": source, "html_root": str(html_root),
                "split_rule": f"pages sorted by path, non-empty ones numbered i = 0, 1, ...: "
                              f"i % {SPLIT_PERIOD} == {SPLIT_RULE['val']} -> val, "
                              f"i % {SPLIT_PERIOD} == {SPLIT_RULE['test']} -> test, else train",
                "files": {}}
    for split in SPLITS:
        data = ("\n\n".join(text for _, text in splits[split]) + "\n").encode("utf-8")
        write_atomic(out / f"{split}.txt", data)
        manifest["files"][split] = {"file": f"{split}.txt", "documents": len(splits[split]), "bytes": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest(),
                                    "pages": [page for page, _ in splits[split]]}
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return manifest


def fetch_package_html(workdir: Path) -> tuple[Path, str]:
    """(html folder, description) of python3.11-doc downloaded and unpacked into `workdir`."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(f"{PACKAGE} is not installed ({INSTALLED_HTML} missing) and `{tool}` is not available "
                              f"to download it; install {PACKAGE} or pass --html <its html folder>")
    result = subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, capture_output=True, text=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        reason = (result.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise CorpusError(f"`apt-get download {PACKAGE}` failed ({reason}); install {PACKAGE} "
                          f"or pass --html <its html folder>")
    unpacked = workdir / "unpacked"
    result = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True, text=True)
    html = unpacked / HTML_IN_PACKAGE
    if result.returncode != 0 or not html.is_dir():
        reason = (result.stderr.strip().splitlines() or [f"no {HTML_IN_PACKAGE} in it"])[-1]
        raise CorpusError(f"`dpkg-deb -x {debs[0].name}` failed ({reason})")
    return html, f"{debs[0].name} (apt-get download)"


def default_out() -> Path:
    return Path(os.environ.get("QAT_DATA") or "data") / "pydoc"


def build(out: Path, html: Path | None = None) -> dict:
    """Build the corpus into `out` from `html`, the installed package, or a download (module docstring)."""
    if html is not None:
        if not html.is_dir():
            raise CorpusError(f"--html {html} is not a folder; pass the html folder of {PACKAGE}")
        return write_corpus(html, out, f"{html} (--html)")
    if INSTALLED_HTML.is_dir():
        return write_corpus(INSTALLED_HTML, out, f"{INSTALLED_HTML} (installed {PACKAGE})")
    with tempfile.TemporaryDirectory(prefix="pydoc-") as workdir:
        html_root, source = fetch_package_html(Path(workdir))
        return write_corpus(html_root, out, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat.train.text_corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $QAT_DATA/pydoc or data/pydoc)")
    parser.add_argument("--html", type=Path, default=None, help=f"an unpacked {PACKAGE} html folder to read instead")
    args = parser.parse_args(argv)
    out = args.out or default_out()
    manifest = build(out, args.html)
    files = manifest["files"]
    print(f"wrote {out}: " + ", ".join(f"{split} {files[split]['documents']} pages {files[split]['bytes']:,} B"
                                       for split in SPLITS) + f" (from {manifest['source']})")
    return 0


if __name__ == "__main__":
    from qat.train import cli

    sys.exit(cli.guard(main, "python -m qat.train.text_corpus"))

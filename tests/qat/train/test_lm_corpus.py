"""The text corpus of data=pydoc (qat.train.text_corpus): HTML to text, the fixed split, the files."""
import hashlib
import json

import pytest

from qat.train import cli, text_corpus
from qat.train.text_corpus import html_to_text, page_paths, split_of, write_corpus

PAGE = """<html><head><script>var x = 1;</script><style>p {color: red}</style></head><body>
<div class="related" role="navigation"><a href="index.html">index</a> | <a href="x.html">next</a></div>
<div class="document"><div class="body" role="main">
<h1>4. More  Control<a class="headerlink" href="#x" title="Permalink">&#182;</a></h1>
<p>Besides the <code class="xref"><span class="pre">while</span></code> statement
just   introduced, Python uses &lt;the&gt; usual ones.</p>
<div class="highlight"><pre><span></span><span class="gp">&gt;&gt;&gt; </span><span class="k">for</span> w \
<span class="ow">in</span> words:
<span class="gp">... </span>    <span class="nb">print</span>(w)
</pre></div>
<ul><li><p>first item</p></li><li>second item</li></ul>
<script>alert("no")</script>
</div></div>
<div class="sphinxsidebar" role="navigation"><h3>Table of Contents</h3><p>sidebar text</p></div>
<div class="footer">Copyright footer</div></body></html>"""


def test_html_keeps_the_main_content_and_code_blocks_verbatim():
    text = html_to_text(PAGE)
    assert text == ("4. More Control\n\n"
                    "Besides the while statement just introduced, Python uses <the> usual ones.\n\n"
                    ">>> for w in words:\n...     print(w)\n\n"
                    "first item\n\nsecond item")
    for dropped in ("index", "sidebar", "footer", "alert", "var x", "color", "\u00b6"):
        assert dropped not in text


def make_tree(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'<div class="body" role="main"><p>page {name}</p></div>')


def test_pages_are_sorted_and_index_pages_skipped(tmp_path):
    make_tree(tmp_path, ["b.html", "a/z.html", "a/b.html", "genindex-A.html", "search.html", "_sources/x.html",
                         "py-modindex.html", "contents.html"])
    assert [p.as_posix() for p in page_paths(tmp_path)] == ["a/b.html", "a/z.html", "b.html"]


def test_split_rule_is_fixed():
    assert [split_of(i) for i in range(12)] == ["train"] * 4 + ["val"] + ["train"] * 4 + ["test"] + ["train"] * 2


def test_corpus_files_are_deterministic_and_described_by_the_manifest(tmp_path):
    names = [f"p{i:02d}.html" for i in range(20)]
    make_tree(tmp_path / "html", names)
    first = write_corpus(tmp_path / "html", tmp_path / "one", "test")
    make_tree(tmp_path / "html2", reversed(names))  # creation order does not matter
    second = write_corpus(tmp_path / "html2", tmp_path / "two", "test")
    for split in ("train", "val", "test"):
        data = (tmp_path / "one" / f"{split}.txt").read_bytes()
        assert data == (tmp_path / "two" / f"{split}.txt").read_bytes()
        assert first["files"][split]["sha256"] == hashlib.sha256(data).hexdigest()
        assert first["files"][split]["bytes"] == len(data)
    assert first["files"]["val"]["pages"] == ["p04.html", "p14.html"]
    assert first["files"]["test"]["pages"] == ["p09.html", "p19.html"]
    assert first["files"]["train"]["documents"] == 16
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["files"] == first["files"]
    assert second["files"]["val"]["sha256"] == first["files"]["val"]["sha256"]
    assert not list((tmp_path / "one").glob(".*partial"))  # temporary files renamed away


def test_missing_package_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(text_corpus, "INSTALLED_HTML", tmp_path / "not-installed")
    monkeypatch.setattr(text_corpus.shutil, "which", lambda tool: None)
    status = cli.guard(lambda: text_corpus.main(["--out", str(tmp_path / "out")]), "python -m qat.train.text_corpus")
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and "python3.11-doc is not installed" in err and "--html" in err
    assert not (tmp_path / "out").exists()


def test_too_few_pages_name_the_fix(tmp_path):
    make_tree(tmp_path / "html", ["a.html"])
    with pytest.raises(text_corpus.CorpusError, match="too few for a train and a validation split"):
        write_corpus(tmp_path / "html", tmp_path / "out", "test")

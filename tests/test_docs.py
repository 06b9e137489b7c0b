"""The built documentation reads offline, with its math rendered: the offline check
finds remote resources and missing renderers, and a small build with the project's
conf.py passes it, with real class signatures and no empty sidebar.

Also a script, which CI runs on the full build::

    python tests/test_docs.py --expect-math HTML_DIR

It exits 1, listing every problem, if a page loads a script, stylesheet, font or
image from the network, or a page with math lacks a local MathJax to render it.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Attributes that make a browser fetch something when the page loads (an <a href>
# is followed only on a click, so it may point anywhere).
_FETCHED = {"src", "srcset", "poster", "data"}
_REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)
_CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])\s*((?:https?:)?//[^'")\s]+)""",
                      re.IGNORECASE)


class _Page(HTMLParser):
    """The resources one HTML page loads, and whether it has math."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.loads: list[tuple[str, str]] = []  # (tag, url)
        self.scripts: list[str] = []
        self.has_math = False
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attributes = {name: value or "" for name, value in attrs}
        for name, value in attributes.items():
            if name in _FETCHED or (tag == "link" and name == "href"):
                # srcset: "url 1x, url 2x"
                for url in (value.split(",") if name == "srcset" else [value]):
                    self.loads.append((tag, url.strip().split(" ")[0]))
            if name == "style":
                self.loads.extend(("style", url) for url in _CSS_URL.findall(value))
        if tag == "script" and attributes.get("src"):
            self.scripts.append(attributes["src"])
        if "math" in attributes.get("class", "").split():
            self.has_math = True
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.loads.extend(("style", url) for url in _CSS_URL.findall(data))


def _local_mathjax(page: Path, scripts: list[str]) -> tuple[Path | None, str | None]:
    """The MathJax file a page loads from the build, or None and what is wrong."""
    candidates = [src for src in scripts if "mathjax" in src.lower()]
    if not candidates:
        return None, "has math but loads no MathJax script"
    for src in candidates:
        if _REMOTE.match(src):
            return None, f"loads MathJax from the network: {src}"
        path = (page.parent / src.split("?")[0]).resolve()
        if not path.is_file():
            return None, f"loads MathJax from {src}, which is not in the build"
        if "MathJax" not in path.read_text(encoding="utf-8", errors="replace"):
            return None, f"{src} is not MathJax"
        return path, None
    return None, "no usable MathJax script"  # pragma: no cover (candidates is not empty)


def _fonts_problem(mathjax: Path) -> str | None:
    """MathJax's CHTML output needs its web fonts next to it (it finds them by path)."""
    if "chtml" not in mathjax.name:
        return None
    fonts = mathjax.parent / "output" / "chtml" / "fonts"
    if not any(fonts.glob("**/*.woff*")):
        return f"{mathjax.name} renders with web fonts, but {fonts} has none"
    return None


def offline_problems(html_dir) -> tuple[list[str], dict]:
    """Everything in a built site that needs the network to show.

    Returns the problems (empty when the site reads offline) and counts:
    ``pages``, ``math_pages`` and ``mathjax`` (the MathJax files used, relative
    to the build).
    """
    root = Path(html_dir)
    problems: list[str] = []
    pages = sorted(root.rglob("*.html"))
    mathjax: set[str] = set()
    math_pages = 0
    for page in pages:
        name = page.relative_to(root)
        parsed = _Page()
        parsed.feed(page.read_text(encoding="utf-8", errors="replace"))
        problems += [f"{name}: <{tag}> loads {url}" for tag, url in parsed.loads
                     if _REMOTE.match(url)]
        if parsed.has_math:
            math_pages += 1
            path, problem = _local_mathjax(page, parsed.scripts)
            if problem:
                problems.append(f"{name}: {problem}")
            else:
                assert path is not None
                mathjax.add(str(path.relative_to(root.resolve())))
                fonts = _fonts_problem(path)
                if fonts:
                    problems.append(f"{name}: {fonts}")
    for sheet in sorted(root.rglob("*.css")):
        problems += [f"{sheet.relative_to(root)}: loads {url}"
                     for url in _CSS_URL.findall(sheet.read_text(encoding="utf-8",
                                                                  errors="replace"))]
    return problems, {"pages": len(pages), "math_pages": math_pages,
                      "mathjax": sorted(mathjax)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", help="the output folder of sphinx-build -b html")
    parser.add_argument("--expect-math", action="store_true",
                        help="fail unless at least one page has math")
    args = parser.parse_args(argv)
    problems, counts = offline_problems(args.html_dir)
    if counts["pages"] == 0:
        problems.append(f"no HTML pages under {args.html_dir}")
    if args.expect_math and counts["math_pages"] == 0:
        problems.append("no page has math (--expect-math): nothing rendered was checked")
    for problem in problems:
        print(problem)
    print(f"docs offline check: {counts['pages']} pages, {counts['math_pages']} with math "
          f"rendered by {', '.join(counts['mathjax']) or 'nothing'}; "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


# -- the check itself, on hand-written pages ---------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _mathjax_tree(root: Path) -> None:
    _write(root / "_static/mathjax/tex-chtml.js", "/* MathJax */ window.MathJax = {};")
    _write(root / "_static/mathjax/output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff", "")


def test_remote_resources_are_found(tmp_path):
    _write(tmp_path / "index.html", """<html><head>
        <script src="https://cdn.example.org/lib.js"></script>
        <link rel="stylesheet" href="//fonts.example.org/css?family=X">
        <link rel="stylesheet" href="_static/local.css">
        <style>@import url("https://cdn.example.org/theme.css");</style>
        </head><body>
        <a href="https://pylops.readthedocs.io">a link is fine</a>
        <img src="HTTP://example.org/figure.png">
        <img srcset="_static/a.png 1x, https://example.org/b.png 2x">
        <div style="background: url('https://example.org/bg.png')"></div>
        </body></html>""")
    _write(tmp_path / "_static/local.css",
           "@font-face { src: url(https://fonts.example.org/f.woff2); }\n"
           ".ok { background: url(img.png); }")
    problems, counts = offline_problems(tmp_path)
    found = "\n".join(problems)
    for url in ["https://cdn.example.org/lib.js", "//fonts.example.org/css?family=X",
                "https://cdn.example.org/theme.css", "HTTP://example.org/figure.png",
                "https://example.org/b.png", "https://example.org/bg.png",
                "https://fonts.example.org/f.woff2"]:
        assert url in found
    assert len(problems) == 7, problems  # not the link, not the local files
    assert counts == {"pages": 1, "math_pages": 0, "mathjax": []}


@pytest.mark.parametrize(
    "script, tree, expected",
    [
        ("", False, "has math but loads no MathJax script"),
        ('<script src="https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js"></script>',
         False, "loads MathJax from the network"),
        ('<script src="_static/mathjax/tex-chtml.js"></script>', False, "not in the build"),
        ('<script src="_static/mathjax/tex-chtml.js"></script>', True, None),
    ],
)
def test_math_needs_a_local_mathjax(tmp_path, script, tree, expected):
    if tree:
        _mathjax_tree(tmp_path)
    _write(tmp_path / "page.html", f'<html><head>{script}</head><body>'
           r'<div class="math notranslate nohighlight">\[x^2\]</div></body></html>')
    _write(tmp_path / "plain.html", "<html><body><p>no math</p></body></html>")
    problems, counts = offline_problems(tmp_path)
    assert counts["pages"] == 2 and counts["math_pages"] == 1
    if expected is None:
        assert problems == [] and counts["mathjax"] == ["_static/mathjax/tex-chtml.js"]
    else:
        # (a CDN script is also reported as a remote load)
        assert any(expected in problem for problem in problems), problems
        assert all(problem.startswith("page.html: ") for problem in problems)


def test_mathjax_without_its_fonts_is_a_problem(tmp_path):
    _mathjax_tree(tmp_path)
    shutil.rmtree(tmp_path / "_static/mathjax/output")
    _write(tmp_path / "sub/page.html",
           '<script src="../_static/mathjax/tex-chtml.js"></script>'
           '<span class="math">\\(x\\)</span>')
    problems, _ = offline_problems(tmp_path)
    assert len(problems) == 1 and "has none" in problems[0]


def test_script_exit_status(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1  # no pages at all
    _write(tmp_path / "index.html", "<p>text</p>")
    assert main([str(tmp_path)]) == 0
    assert main(["--expect-math", str(tmp_path)]) == 1
    assert "no page has math" in capsys.readouterr().out


# -- a small build with the project's own conf.py -----------------------------------------

_DOCS_EXTRA = ["sphinx", "myst_parser", "numpydoc", "pydata_sphinx_theme", "matplotlib",
               "sphinx-mathjax-offline"]


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    """A three-page site built by sphinx-build with docs/conf.py: math, a class, a page."""
    missing = [name for name in _DOCS_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {', '.join(missing)})")
    import sparse_tconv

    src = tmp_path_factory.mktemp("src")
    out = src.parent / (src.name + "-html")
    _write(src / "index.md", "# Index\n\n```{toctree}\nmath\nclass\napi\n```\n")
    _write(src / "math.md", "# Math\n\nInline $O = L - k + 1$ and\n\n$$\n\\sum_i x_i\n$$\n")
    _write(src / "class.md", "# Class\n\n```{eval-rst}\n.. autoclass:: "
           "sparse_tconv.ConvOperator\n```\n")
    # conf.py checks that api.md lists every public name (one per indented line).
    # It has a sub-page, as the API reference has its generated pages.
    _write(src / "api.md", "# API\n\n```{toctree}\nchild\n```\n\n```text\n"
           + "".join(f"   {name}\n" for name in sparse_tconv.__all__) + "```\n")
    _write(src / "child.md", "# Child\n")
    run = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b", "html",
         "-c", str(DOCS), str(src), str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def test_small_build_reads_offline(small_build):
    problems, counts = offline_problems(small_build)
    assert problems == []
    assert counts["math_pages"] == 1
    assert counts["mathjax"] == ["_static/mathjax/tex-chtml.js"]
    assert main(["--expect-math", str(small_build)]) == 0


def test_small_build_class_signature(small_build):
    text = (small_build / "class.html").read_text(encoding="utf-8")
    signature = re.search(r'<dt class="sig sig-object py" id="sparse_tconv.ConvOperator">'
                          r"(.*?)</dt>", text, flags=re.S)
    assert signature is not None
    params = re.findall(r'<em class="sig-param">(.*?)</em>', signature[1], flags=re.S)
    names = [re.sub(r"<[^>]+>", "", p).split("=")[0] for p in params]
    # The constructor's parameters, as Python sees them, not LinearOperator.__new__'s.
    import inspect

    from sparse_tconv import ConvOperator

    expected = [str(p).split("=")[0] for p in inspect.signature(ConvOperator).parameters.values()]
    assert [n for n in names if n != "*"] == expected
    assert names[:2] == ["weight", "input_shape"]


def _sidebar_hidden(page: Path) -> bool:
    """Whether pydata's left sidebar is hidden on wide screens on this page."""
    text = page.read_text(encoding="utf-8")
    assert "_static/layout.css" in text  # the site's CSS is linked
    sidebar = re.search(r'<div id="pst-primary-sidebar" class="([^"]*)"', text)
    assert sidebar is not None
    return "hide-on-wide" in sidebar[1].split()


def test_small_build_layout(small_build):
    # One-level pages: no empty left column; a section with sub-pages keeps its
    # navigation, on the section's page and on the sub-page.
    assert _sidebar_hidden(small_build / "math.html")
    assert _sidebar_hidden(small_build / "class.html")
    assert not _sidebar_hidden(small_build / "api.html")
    assert not _sidebar_hidden(small_build / "child.html")
    assert 'href="child.html"' in (small_build / "api.html").read_text(encoding="utf-8")
    css = (small_build / "_static/layout.css").read_text(encoding="utf-8")
    assert "overflow-x: auto" in css


if __name__ == "__main__":
    sys.exit(main())

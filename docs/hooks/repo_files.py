"""mkdocs hook: the pages link to files of the repository outside docs/ (the studies in
train_free_runs/, the code, the tests) by relative paths, which work on GitHub as they are.

At build time each such target is checked to exist inside the repository (a missing one, or one
outside it, fails the build) and copied into the site at its repository path; Markdown targets
become pages whose own links are followed the same way, a folder link goes to the folder's
README.md or to a generated listing of its files. The pages' links are rewritten to those copies.

A page may also show a repository file's Markdown in place: the line
``<!-- include path/from/the/repository.md -->`` becomes that file's text (its links rebased), or
a note that it has not been recorded yet while the file does not exist.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files, InclusionLevel

# the target of a Markdown link or image, and of an HTML src/href (the studies' <img src=...>)
LINK = re.compile(r"(\]\(|\b(?:src|href)=\")([^)\"\s]+)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:|^/|^#", re.I)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
FENCE = re.compile(r"(```.*?```)", re.S)
# an HTML image (the studies' <img src="x.png" width="360">), written as Markdown so that mkdocs
# makes its address relative to the page's URL
IMG = re.compile(r'<img src="([^"]+)"(?: width="(\d+)")?\s*/?>')
# a Sphinx role left in a docstring (:class:`~a.b.C`), as mkdocstrings renders it
ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc):<code>(~?)([^<]*)</code>")
INCLUDE = re.compile(r"^<!-- include (\S+) -->$", re.M)

# the repository paths already scanned or copied in this build
_SEEN: set[str] = set()


def _targets(text: str):
    """(start, end, target) of every relative link outside code."""
    spans = [m.span() for m in CODE.finditer(text)]
    for match in LINK.finditer(text):
        if any(a <= match.start(2) < b for a, b in spans):
            continue
        target = match.group(2)
        if not EXTERNAL.match(target):
            yield match.start(2), match.end(2), target


def _resolve(repo: Path, page_repo_path: str, target: str) -> tuple[str, str]:
    """The repository path a link points to and its anchor; a folder's is its README.md, or
    the index.md of the listing generated for it."""
    path, _, anchor = target.partition("#")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo_path), path))
    if resolved == ".." or resolved.startswith("../"):
        raise PluginError(f"{page_repo_path}: link {target!r} leaves the repository")
    if not (repo / resolved).exists():
        raise PluginError(f"{page_repo_path}: link {target!r} points to {resolved}, which does not exist")
    if (repo / resolved).is_dir():
        readme = posixpath.join(resolved, "README.md")
        return (readme if (repo / readme).is_file() else posixpath.join(resolved, "index.md")), anchor
    return resolved, anchor


def _listing(repo: Path, folder: str) -> str:
    entries = sorted((repo / folder).iterdir())
    lines = [f"# `{folder}/`", "", "The files of this folder of the repository:", ""]
    lines += [f"- [`{p.name}`]({p.name})" if p.is_file() else f"- `{p.name}/`" for p in entries]
    return "\n".join(lines) + "\n"


def on_files(files: Files, config) -> Files:
    """Every repository file the pages link to (transitively, through copied Markdown) joins the site."""
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    docs_prefix = docs.relative_to(repo).as_posix()
    queue = [f"{docs_prefix}/{f.src_uri}" for f in files.documentation_pages()]
    _SEEN.clear()
    _SEEN.update(queue)
    while queue:
        page = queue.pop()
        source = (repo / page).read_text(encoding="utf-8") if (repo / page).exists() else ""
        for included in INCLUDE.findall(source):
            if (repo / included).is_file() and included not in queue:
                queue.append(included)  # its links are followed; it is shown, not copied
        for _, _, target in _targets(source):
            resolved, _ = _resolve(repo, page, target)
            if resolved.startswith(docs_prefix + "/") or resolved in _SEEN:
                continue  # a docs page (mkdocs checks it) or already copied
            _SEEN.add(resolved)
            if files.get_file_from_path(resolved) is not None:
                raise PluginError(f"{page}: {resolved} would overwrite a page of docs/")
            if not (repo / resolved).exists():  # a folder without README.md: its listing
                folder = posixpath.dirname(resolved)
                listing = File.generated(config, resolved, content=_listing(repo, folder))
                listing.inclusion = InclusionLevel.NOT_IN_NAV
                files.append(listing)
                for entry in sorted(p for p in (repo / folder).iterdir() if p.is_file()):
                    path = posixpath.join(folder, entry.name)
                    if path not in _SEEN:
                        _add(files, config, repo, path)
                        if entry.suffix == ".md":
                            queue.append(path)
                continue
            _add(files, config, repo, resolved)
            if resolved.endswith(".md"):
                queue.append(resolved)
    return files


def _add(files: Files, config, repo: Path, path: str) -> None:
    _SEEN.add(path)
    if files.get_file_from_path(path) is None:
        file = File(path, src_dir=str(repo), dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"])
        file.inclusion = InclusionLevel.NOT_IN_NAV  # a linked page, not one of the site's own
        files.append(file)


def _rebase(markdown: str, repo: Path, docs_prefix: str, source: str, src: str) -> str:
    """``markdown`` read from repository path ``source``, its links made relative to page ``src``."""
    out, last = [], 0
    for start, end, target in _targets(markdown):
        resolved, anchor = _resolve(repo, source, target)
        if resolved.startswith(docs_prefix + "/"):
            resolved = resolved[len(docs_prefix) + 1:]  # a docs page: its own path in the site
            if source.startswith(docs_prefix + "/"):
                continue  # mkdocs resolves (and checks) a page's links to the other pages
        new = posixpath.relpath(resolved, posixpath.dirname(src) or ".")
        out += [markdown[last:start], new + (f"#{anchor}" if anchor else "")]
        last = end
    return "".join(out) + markdown[last:]


def _images(markdown: str) -> str:
    """HTML images as Markdown images (with attr_list's width)."""
    return IMG.sub(lambda m: f"![]({m.group(1)})" + (f'{{ width="{m.group(2)}" }}' if m.group(2) else ""), markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Links to repository files become links to their copies in the site; includes are expanded."""
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    docs_prefix = docs.relative_to(repo).as_posix()
    src = page.file.src_uri
    markdown = _images(markdown)
    in_docs = page.file.abs_src_path and Path(page.file.abs_src_path).resolve().is_relative_to(docs)
    markdown = _rebase(markdown, repo, docs_prefix, f"{docs_prefix}/{src}" if in_docs else src, src)

    def include(match: re.Match) -> str:
        path = match.group(1)
        if not (repo / path).is_file():
            return f"!!! note\n    Not recorded yet: this section will show `{path}` once it exists.\n"
        text = _images((repo / path).read_text(encoding="utf-8"))
        text = "".join(part if part.startswith("```") else re.sub(r"^#", "##", part, flags=re.M)
                       for part in FENCE.split(text))  # headings below the page's own title
        return _rebase(text, repo, docs_prefix, path, src)
    return INCLUDE.sub(include, markdown)


def on_page_content(html: str, page, config, files) -> str:
    """The docstrings' Sphinx roles as plain code (``~`` keeps the last name only)."""
    def plain(match: re.Match) -> str:
        tilde, name = match.groups()
        return f"<code>{name.rsplit('.', 1)[-1] if tilde else name}</code>"
    return ROLE.sub(plain, html)

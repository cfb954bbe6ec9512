"""Turn the book's MyST Markdown into plain Markdown, for the notebooks learners open.

JupyterLab, Jupyter Notebook and Colab render CommonMark (with tables and $...$ math), not
MyST: a `{glue:text}` role or a ```{exercise} fence shows up raw there. `Converter` rewrites
one notebook's markdown cells so that they read as the book does:

- glued values (`{glue:text}`, `{glue}`, `{glue:md}`, `{glue:math}` roles; `{glue}`,
  `{glue:figure}`, `{glue:md}`, `{glue:math}` directives) become the values stored in the
  notebook's outputs, formatted with the role's format spec as myst-nb does (`:.1f`);
  figures become cell attachments;
- `{exercise}` fences become "**Exercise 4.1** (title)" and their text, numbered as the book
  numbers them (chapter . index); admonitions (`{note}`, `{warning}`, ...) become block
  quotes with a bold title; `{math}` becomes $...$ / $$...$$; code directives become fenced
  code; any other directive keeps its text;
- `{cite}` becomes "[Ioffe and Szegedy, 2015]", linked to the work where references.bib gives
  a URL or DOI, and the notebook ends with the list of the works it cites; `{doc}`, `{ref}`,
  `{numref}` and `{eq}` become the text the book shows, linked to the notebook (the copies
  sit side by side in one folder); other roles keep their text;
- `(label)=` targets and equation labels are dropped;
- solutions (kept in the whole-chapter copies only) read "**Solution to Exercise 4.1** (title)".

Fenced code blocks and inline code are left as they are.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import nbformat
from myst_nb.core.variables import format_plain_text  # the format myst-nb applies to {glue:text}
from pybtex.database import parse_file
from pybtex.plugin import find_plugin

# An inline role `{name}`text`` or a plain code span `text` (left alone).
INLINE = re.compile(
    r"(?:\{(?P<role>[A-Za-z][\w:.+-]*)\})?(?P<ticks>`+)(?P<body>.+?)(?<!`)(?P=ticks)(?!`)", re.S
)
DIRECTIVE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,}|:{3,})\s*\{(?P<name>[^}\s]+)\}[ \t]*(?P<arg>.*)$"
)
CODE_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
TARGET = re.compile(r"^[ \t]*\((?P<label>[^()\s]+)\)=[ \t]*$")
# `$$ (label)`, the end of a labelled equation
MATH_LABEL = re.compile(r"^(?P<head>[ \t]*\$\$)[ \t]*\((?P<label>[^()\s]+)\)[ \t]*$")
HEADING = re.compile(r"^#{1,6}[ \t]+(?P<text>.+?)[ \t#]*$")
OPTION = re.compile(r"^:(?P<key>[\w-]+):[ \t]*(?P<value>.*)$")
EXPLICIT = re.compile(r"^(?P<text>.*?)\s*<(?P<target>[^<>]+)>$", re.S)  # `text <target>`

ADMONITIONS = {
    "note", "warning", "tip", "important", "hint", "caution", "attention", "danger", "error",
    "seealso", "admonition", "dropdown", "margin", "sidebar", "topic", "epigraph", "pull-quote",
}
TITLES = {"seealso": "See also", "pull-quote": "", "epigraph": "", "margin": "", "sidebar": ""}
CODE_DIRECTIVES = {"code", "code-block", "sourcecode", "code-cell"}
DROPPED_DIRECTIVES = {"toctree", "tableofcontents", "solution-end", "exercise-end", "index"}
CODE_ROLES = {"code", "literal", "samp", "file", "command", "program", "envvar", "option"}
PYTHON_ROLES = {"func", "class", "meth", "mod", "attr", "obj", "data", "exc"}
HTML_ROLES = {"sub": "sub", "sup": "sup", "subscript": "sub", "superscript": "sup", "kbd": "kbd"}


# ------------------------------------------------------------------ what the book knows


@dataclass
class Work:
    """One entry of references.bib: as the book cites it, and as its bibliography lists it."""
    authors: str  # "Ioffe and Szegedy", "Chan et al."
    year: str
    url: str  # "" where the entry has no URL or DOI
    text: str  # the full reference, in Markdown
    rank: int = 0  # position in the book's sort order (sphinxcontrib-bibtex's default "alpha"
    # style sorts by author, year, title, and so orders the works of one citation)


def read_bib(path: Path) -> dict[str, Work]:
    """key -> Work for every entry of a BibTeX file (author-year labels, as the book's)."""
    bib = parse_file(str(path))
    style = find_plugin("pybtex.style.formatting", "unsrt")()
    texts = {e.key: " ".join(e.text.render_as("markdown").split())
             for e in style.format_entries(bib.entries.values())}
    order = find_plugin("pybtex.style.sorting", "author_year_title")().sort(list(bib.entries.values()))
    rank = {e.key: i for i, e in enumerate(order)}
    works = {}
    for key, entry in bib.entries.items():
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [" ".join(str(n) for n in p.rich_last_names) for p in people] or [key]
        authors = " and ".join(names) if len(names) <= 2 else f"{names[0]} et al."
        doi = entry.fields.get("doi", "")
        url = entry.fields.get("url", "") or (f"https://doi.org/{doi}" if doi else "")
        works[key] = Work(authors, entry.fields.get("year", ""), url, texts[key], rank[key])
    return works


@dataclass
class Target:
    """What a label points to: the text the book shows for it, and where it is."""
    text: str
    docname: str
    anchor: str = ""  # a heading's anchor in the notebook ("" for the notebook's top)
    title: str = ""  # an exercise's title
    number: str = ""  # what {numref} shows: "Exercise 4.1", "Fig. 4.1", "Section 4.2"


def anchor(heading: str) -> str:
    """The anchor JupyterLab and Notebook give a heading: its text, spaces as '-'."""
    return re.sub(r"\s+", "-", heading.strip())


@dataclass
class Book:
    """The book's documents, labels, equation numbers and bibliography, for cross-references."""
    titles: dict[str, str] = field(default_factory=dict)  # docname -> title
    notebooks: dict[str, Path] = field(default_factory=dict)  # docname -> .ipynb path
    labels: dict[str, Target] = field(default_factory=dict)
    equations: dict[str, Target] = field(default_factory=dict)  # label -> "(n)" in its document
    works: dict[str, Work] = field(default_factory=dict)
    repository: str = ""  # the book's repository (_config.yml), where Colab installs bnkit from

    @classmethod
    def read(cls, root: Path, documents: list[Path], bib: Path | None = None) -> "Book":
        """The book whose source folder is root, with the given documents (.ipynb or .md)."""
        book = cls(works=read_bib(bib) if bib and bib.exists() else {})
        for path in documents:
            if not path.exists():
                continue
            docname = path.relative_to(root).with_suffix("").as_posix()
            if path.suffix == ".ipynb":
                book.notebooks[docname] = path
                nb = nbformat.read(path, as_version=4)
                sources = [c.source for c in nb.cells if c.cell_type == "markdown"]
            else:
                sources = [path.read_text(encoding="utf-8")]
            book._index(docname, sources, chapter_number(path))
        return book

    def _index(self, docname: str, sources: list[str], chapter: str) -> None:
        """Collect the document's title and what its labels point to, numbered as Sphinx
        numbers them in a numbered book: exercises ("Exercise 4.1"), labelled equations
        ("(4.1)"), named figures ("Fig. 4.1"), sections ("Section 4.2", from the headings)."""
        counts = {"exercise": 0, "equation": 0, "figure": 0}
        sections: list[int] = []  # the current section's number below the chapter's
        label = None  # a `(label)=` waiting for its heading
        directive, title, figure = None, "", None  # the directive whose options come next

        def numbered(kind: str) -> str:
            counts[kind] += 1
            return f"{chapter}.{counts[kind]}" if chapter else str(counts[kind])

        for line in _outside_code("\n".join(sources).splitlines()):
            if directive and (m := OPTION.match(line.strip())):
                key, value = m["key"], m["value"].strip()
                if key == "label" and directive == "exercise":
                    number = f"Exercise {chapter}.{counts['exercise']}" if chapter else \
                        f"Exercise {counts['exercise']}"
                    self.labels[value] = Target(number, docname, title=title, number=number)
                elif key == "label" and directive == "math":
                    self.equations[value] = Target(f"({numbered('equation')})", docname)
                elif key == "name" and directive in ("figure", "glue:figure"):
                    number = f"Fig. {numbered('figure')}"
                    figure = self.labels[value] = Target(number, docname, number=number)
                continue
            directive = None
            if figure and line.strip():  # a named figure's caption, the first line of its text
                figure.text, figure = line.strip(), None
            if m := TARGET.match(line):
                label = m["label"]
            elif m := HEADING.match(line):
                level = len(line) - len(line.lstrip("#"))
                if docname not in self.titles:
                    self.titles[docname], top = m["text"], level
                else:
                    depth = max(level - top, 1)
                    sections = sections[:depth] + [0] * (depth - len(sections))
                    sections[depth - 1] += 1
                if label:
                    number = ".".join([chapter, *map(str, sections)]) if chapter else ""
                    self.labels[label] = Target(m["text"], docname, anchor(m["text"]),
                                                number=f"Section {number}" if number else "")
                label = None
            elif m := DIRECTIVE.match(line):
                directive, title = m["name"], m["arg"].strip()
                counts["exercise"] += directive == "exercise"
            elif m := MATH_LABEL.match(line):
                self.equations[m["label"]] = Target(f"({numbered('equation')})", docname)
            elif line.strip():
                label = None


def _outside_code(lines: list[str]):
    """The lines that are not inside a fenced code block (a directive's fences are not code)."""
    code, directives = None, []  # the open code fence; the open directives' fences

    def closes(line: str, fence: str) -> bool:
        return bool(line.strip()) and set(line.strip()) == {fence[0]} and len(line.strip()) >= len(fence)

    for line in lines:
        if code:
            code = None if closes(line, code) else code
            continue
        if directives and closes(line, directives[-1]):
            directives.pop()
        elif m := DIRECTIVE.match(line):
            directives.append(m["fence"])
        elif m := CODE_FENCE.match(line):
            code = m["fence"]
            continue
        yield line


def chapter_number(path: Path) -> str:
    """'1' for chapters/01_five_steps.ipynb; '' when the name has no leading digits."""
    m = re.match(r"\d+", path.name)
    return str(int(m[0])) if m else ""


def glue_data(nb: nbformat.NotebookNode) -> dict[str, dict]:
    """key -> MIME bundle of every value the notebook glued (myst_nb.glue), from its outputs."""
    data = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            meta = out.get("metadata", {}).get("scrapbook")
            if meta and "data" in out:
                prefix = meta.get("mime_prefix", "")
                data[meta["name"]] = {k.removeprefix(prefix): v for k, v in out["data"].items()}
    return data


# ------------------------------------------------------------------ the conversion


class ConversionError(ValueError):
    """A MyST construct that cannot be turned into plain Markdown (e.g. an unknown glue key)."""


class Converter:
    """Converts the markdown cells of one notebook, in order (exercises are counted across cells).

    book: the book (cross-references, bibliography); docname: the notebook's name in it
    ("chapters/04_running_estimates"); glue: glue_data(notebook); chapter: "4".
    """

    def __init__(self, book: Book, docname: str = "", glue: dict | None = None, chapter: str = ""):
        self.book, self.docname, self.glue, self.chapter = book, docname, glue or {}, chapter
        self.exercises = 0
        self.cited: list[str] = []  # keys, in order of first citation
        self.attachments: dict[str, dict] = {}  # of the cell being converted

    def cell(self, source: str) -> tuple[str, dict[str, dict]]:
        """(the plain Markdown of one markdown cell, its attachments: name -> MIME bundle)."""
        self.attachments = {}
        return "\n".join(self.block(source.splitlines())), self.attachments

    def references(self) -> str:
        """A "References" section listing the works cited so far ("" where none)."""
        if not self.cited:
            return ""
        items = [f"- {self.book.works[key].text}" for key in self.cited]
        return "## References\n\n" + "\n".join(items)

    # -- blocks

    def block(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        text: list[str] = []  # ordinary lines, converted together (a role may span lines)

        def flush() -> None:
            if text:
                out.extend(self.inline("\n".join(text)).split("\n"))
                text.clear()

        i = 0
        while i < len(lines):
            line = lines[i]
            directive, code = DIRECTIVE.match(line), CODE_FENCE.match(line)
            if directive or code:
                m = directive or code
                end = _closing(lines, i, m["fence"])
                flush()
                if directive:
                    indent = m["indent"]
                    body = [b.removeprefix(indent) for b in lines[i + 1:end]]
                    converted = self.directive(m["name"], m["arg"].strip(), body)
                    out.extend(indent + x if x else x for x in converted)
                    if end + 1 < len(lines) and lines[end + 1].strip():
                        out.append("")  # text right after the fence: its own paragraph (not a
                        # lazy continuation of a block quote)
                else:
                    out.extend(lines[i:end + 1])  # fenced code stays as it is
                i = end + 1
            elif TARGET.match(line):
                i += 1
            elif m := MATH_LABEL.match(line):  # a labelled equation: its number as the book's
                text.extend([*self._tag(m["label"]), m["head"]])
                i += 1
            else:
                text.append(line)
                i += 1
        flush()
        return out

    def directive(self, name: str, arg: str, body: list[str]) -> list[str]:
        options, body = _options(body)
        if name == "exercise":
            self.exercises += 1
            number = f"{self.chapter}.{self.exercises}" if self.chapter else str(self.exercises)
            head = "**Exercise**" if "nonumber" in options else f"**Exercise {number}**"
            return [head + (f" ({self.inline(arg)})" if arg else ""), "", *self.block(body)]
        if name in ("solution", "solution-start"):  # (learner_copy removes them first)
            target = self.book.labels.get(arg)
            head = f"**Solution to {target.text}**" if target else "**Solution**"
            head += f" ({self.inline(target.title)})" if target and target.title else ""
            return [head, *(["", *self.block(body)] if body else [])]
        if name in ADMONITIONS:
            titled = name in ("admonition", "dropdown", "topic", "sidebar")
            title = arg if titled else TITLES.get(name, name.title())
            quoted = ([f"**{self.inline(title)}**", ""] if title else []) + self.block(body)
            return [f"> {x}" if x.strip() else ">" for x in quoted]
        if name == "math":
            return ["$$", *([arg] if arg else []), *body, *self._tag(options.get("label")), "$$"]
        if name in CODE_DIRECTIVES:
            return [f"```{arg.split()[0] if arg else ''}", *body, "```"]
        if name in ("figure", "image"):
            caption = self._caption(options, body)
            return [f"![{options.get('alt', '')}]({arg})", *(["", *caption] if caption else [])]
        if name.startswith("glue"):
            return self.glue_block(name, arg, options, body)
        if name == "bibliography":
            return ["\n".join(f"- {w.text}" for w in self.book.works.values())]
        if name in DROPPED_DIRECTIVES:
            return []
        # any other directive: its argument in bold, then its text
        return ([f"**{self.inline(arg)}**", ""] if arg else []) + self.block(body)

    def _tag(self, label: str | None) -> list[str]:
        """`\\tag{4.1}` for a labelled equation the book numbers (MathJax and KaTeX show it)."""
        target = self.book.equations.get(label or "")
        return [f"\\tag{{{target.text.strip('()')}}}"] if target else []

    def _caption(self, options: dict, body: list[str]) -> list[str]:
        """A figure's caption, "Fig. 4.1 ..." where the book numbers it (a named figure)."""
        caption = self.block(body)
        target = self.book.labels.get(options.get("name", ""))
        if caption and target and target.number and target.docname == self.docname:
            caption[0] = f"{target.number} {caption[0]}"
        return caption

    def glue_block(self, name: str, key: str, options: dict, body: list[str]) -> list[str]:
        data = self.glued(key)
        kind = name.partition(":")[2] or "any"
        if kind == "md" or (kind == "any" and "text/markdown" in data):
            return self.block(self._mime(data, "text/markdown", key).splitlines())
        if kind == "math":
            return ["$$", self._mime(data, "text/latex", key).strip().strip("$"), "$$"]
        image = next((m for m in ("image/png", "image/jpeg", "image/svg+xml", "image/gif")
                      if m in data), None)
        if image:
            filename = f"{key}.{image.split('/')[1].split('+')[0]}"
            self.attachments[filename] = {image: data[image]}
            caption = self._caption(options, body)
            alt = options.get("alt", " ".join(caption) or key)
            return [f"![{alt}](attachment:{filename})", *(["", *caption] if caption else [])]
        if kind == "figure":
            raise ConversionError(f"glue key {key!r}: a figure needs an image, "
                                  f"the output has {sorted(data)}")
        return [self.glue_text(key, "")]

    # -- inline

    def inline(self, text: str) -> str:
        return INLINE.sub(lambda m: self.role(m["role"], m["body"]) if m["role"] else m[0], text)

    def role(self, name: str, body: str) -> str:
        if name in ("glue", "glue:", "glue:any", "glue:text"):
            key, spec = _key_and_spec(body) if name == "glue:text" else (body, "")
            return self.glue_text(key, spec)
        if name == "glue:md":
            key = _key_and_spec(body)[0]  # the spec is the Markdown flavour
            return self.inline(self._mime(self.glued(key), "text/markdown", key).strip())
        if name == "glue:math":
            return f"${self._mime(self.glued(body), 'text/latex', body).strip().strip('$')}$"
        if name == "math":
            return f"${body}$"
        if name.startswith("cite"):
            return self.cite(name, body)
        if name in ("doc", "ref", "numref", "eq"):
            return self.xref(name, body)
        if name in HTML_ROLES:
            return f"<{HTML_ROLES[name]}>{body}</{HTML_ROLES[name]}>"
        if name == "abbr":
            return re.sub(r"\s*\([^()]*\)$", "", body)
        if name in CODE_ROLES or name.startswith("py:") or name in PYTHON_ROLES:
            shown = m["text"] if (m := EXPLICIT.match(body)) and m["text"] else body
            return f"`{shown.lstrip('~!')}`"
        if name == "download" and (m := EXPLICIT.match(body)):
            return f"[{m['text']}]({m['target']})"
        # any other role (term, index, guilabel, ...): its text
        m = EXPLICIT.match(body)
        return m["text"] if m and m["text"] else body

    def glued(self, key: str) -> dict:
        doc, _, name = key.rpartition("::")
        glue = self.glue
        if doc:  # `path::key`: a value glued in another notebook
            target = self.book.notebooks.get(self._resolve(doc))
            glue = glue_data(nbformat.read(target, as_version=4)) if target else {}
        if name not in glue:
            where = doc or self.docname or "the notebook"
            raise ConversionError(f"no value glued under {name!r} in the stored outputs of {where}")
        return glue[name]

    def glue_text(self, key: str, spec: str) -> str:
        """The glued value as myst-nb formats it, with Markdown's special characters escaped."""
        text = format_plain_text(self._mime(self.glued(key), "text/plain", key), spec or "s")
        return re.sub(r"([\\`*_\[\]<>|$])", r"\\\1", text)

    @staticmethod
    def _mime(data: dict, mime: str, key: str) -> str:
        if mime not in data:
            raise ConversionError(f"glue key {key!r} has no {mime} output (it has {sorted(data)})")
        value = data[mime]
        return "".join(value) if isinstance(value, list) else value

    def cite(self, name: str, body: str) -> str:
        keys = [k.strip() for k in body.split(",") if k.strip()]
        unknown = [k for k in keys if k not in self.book.works]
        if unknown:
            raise ConversionError(f"{{{name}}} cites {unknown}, which references.bib does not hold")
        self.cited += [k for k in keys if k not in self.cited]
        works = sorted((self.book.works[k] for k in keys), key=lambda w: w.rank)  # as the book

        def link(text: str, work: Work) -> str:
            return f"[{text}]({work.url})" if work.url else text

        style = name.partition(":")[2]
        if style in ("t", "ts"):  # Ioffe and Szegedy [2015]
            return ", ".join(f"{w.authors} \\[{link(w.year, w)}\\]" for w in works)
        if style == "author":
            return ", ".join(link(w.authors, w) for w in works)
        if style == "year":
            return ", ".join(link(w.year, w) for w in works)
        return "\\[" + ", ".join(link(f"{w.authors}, {w.year}", w) for w in works) + "\\]"

    def xref(self, name: str, body: str) -> str:
        m = EXPLICIT.match(body)
        text, label = (m["text"], m["target"]) if m and m["text"] else ("", body)
        if name == "doc":
            docname = self._resolve(label)
            title = self.book.titles.get(docname)
            if title is None:
                raise ConversionError(f"{{doc}}`{body}`: no such document in the book")
            return self._link(text or title, Target(title, docname))
        targets = self.book.equations if name == "eq" else self.book.labels
        target = targets.get(label)
        if target is None:
            raise ConversionError(f"{{{name}}}`{body}`: no such label in the book")
        if name == "numref":
            shown = target.number or target.text
            number = shown.rpartition(" ")[2]
            text = text.replace("%s", number).replace("{number}", number) if text else shown
        return self._link(text or target.text, target)

    def _link(self, text: str, target: Target) -> str:
        """text, linked to the target's notebook (a copy in the same folder) or heading."""
        hash_ = f"#{target.anchor}" if target.anchor else ""
        if target.docname == self.docname:
            return f"[{text}]({hash_})" if hash_ else text
        if target.docname in self.book.notebooks:
            return f"[{text}]({PurePosixPath(target.docname).name}.ipynb{hash_})"
        return text  # a page that is not a notebook has no copy to link to

    def _resolve(self, target: str) -> str:
        """A {doc} target as a docname: absolute from the book's root, or relative to this
        document."""
        target = target.removesuffix(".ipynb").removesuffix(".md")
        if target.startswith("/"):
            return target.lstrip("/")
        if not self.docname:  # a notebook outside the book: the one document of that name
            named = [d for d in self.book.titles if d == target or d.endswith("/" + target)]
            return named[0] if len(named) == 1 else target
        return posixpath.normpath(posixpath.join(posixpath.dirname(self.docname), target))


def _closing(lines: list[str], start: int, fence: str) -> int:
    """Index of the line that closes the fence opened at lines[start] (the last line if none)."""
    char = fence[0]
    for j in range(start + 1, len(lines)):
        stripped = lines[j].strip()
        if stripped and set(stripped) == {char} and len(stripped) >= len(fence):
            return j
    return len(lines) - 1


def _key_and_spec(body: str) -> tuple[str, str]:
    """"key:.1f" -> ("key", ".1f"); "key" -> ("key", ""); "doc::key" -> ("doc::key", "")."""
    key, sep, spec = body.rpartition(":")
    return (key, spec) if sep and key and not key.endswith(":") else (body, "")


def _options(body: list[str]) -> tuple[dict[str, str], list[str]]:
    """A directive's options (`:key: value` lines, or a `---` YAML block), and the rest of
    its body."""
    options, i = {}, 0
    if body and body[0].strip() == "---":
        end = next((j for j in range(1, len(body)) if body[j].strip() == "---"), 0)
        for line in body[1:end]:
            key, _, value = line.partition(":")
            options[key.strip()] = value.strip()
        i = end + 1
    else:
        while i < len(body) and (m := OPTION.match(body[i].strip())):
            options[m["key"]] = m["value"]
            i += 1
    while i < len(body) and not body[i].strip():
        i += 1
    return options, body[i:]

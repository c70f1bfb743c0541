#!/usr/bin/env python3
"""Build the demo model's corpus and tokenizer (dev-only, offline).

Corpus: the reStructuredText sources of the Python 3.11 documentation as
shipped by Debian's ``python3.11-doc`` package
(``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``), licensed under the
PSF License Agreement (see ``/usr/share/doc/python3.11-doc/copyright`` and
``license.rst.txt`` inside the corpus), which allows redistribution of
derived works.

The reST markup is stripped by simple rules (see ``clean_rst``): section
adornments, comments and structural directives are dropped, API directives
keep their signature, roles/literals/links keep their text; prose paragraphs
are re-flowed to one line, indented literal blocks keep their line breaks.

Held-out split: every 50th document (sorted by path), about 2% of the text.

Outputs (under ``--out``, default ``runs/demo``):
  corpus/train.txt    training documents, separated by a line "\\f"
  heldout.txt         held-out documents, joined with blank lines (plain text)
  corpus/manifest.json  source package, version, sizes
  tokenizer.model / tokenizer.vocab   sentencepiece BPE, Mixtral special ids

Usage:
  python scripts/demo_corpus.py            # finds the docs or fetches the .deb
  python scripts/demo_corpus.py --src DIR  # DIR = an html/_sources directory
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

DEB = "python3.11-doc"
SOURCES_IN_DEB = "usr/share/doc/python3.11/html/_sources"
CODE_MARK = "\x00code"  # internal: next block is literal
DOC_SEP = "\f"  # line separating documents in train.txt
HOLDOUT_EVERY = 50

ADORN = re.compile(r"^\s*([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
COMMENT_OR_TARGET = re.compile(r"^(\s*)\.\.(\s|$)")
FIELD = re.compile(r"^\s+:[\w -]+:(\s.*)?$")
SIG_DIRECTIVES = {
    "function", "method", "class", "exception", "data", "attribute",
    "classmethod", "staticmethod", "decorator", "decoratormethod",
    "coroutinefunction", "coroutinemethod", "abstractmethod", "module",
    "c:function", "c:macro", "c:type", "c:member", "c:var", "c:struct",
    "opcode", "option", "envvar", "cmdoption", "describe", "pdbcommand",
    "awaitablefunction", "awaitablemethod", "property", "productionlist",
}
LABELLED = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:",
    "impl-detail": "CPython implementation detail:", "tip": "Tip:",
    "important": "Important:", "caution": "Caution:", "attention": "Attention:",
    "admonition": "",
}
VERSIONED = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}:",
}
# directives whose indented body is not prose (dropped with the body)
DROP_BODY = {"toctree", "index", "testsetup", "testcleanup", "only", "raw",
             "image", "figure", "include", "literalinclude", "csv-table",
             "audit-event-table", "limited-api-list", "availability",
             "sectionauthor", "moduleauthor", "highlight", "highlightlang",
             "currentmodule", "program", "c:namespace", "miscnews",
             "audit-event", "tabularcolumns", "contents", "rubric"}

ROLE = re.compile(r":[\w:+.-]+:`([^`]*)`")
LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
REFWORD = re.compile(r"`([^`]+)`__?")
LITERAL = re.compile(r"``(.+?)``")
STRONG = re.compile(r"\*\*(\S(?:[^*]*?\S)?)\*\*")
EMPH = re.compile(r"(?<![\w*\\])\*(\S(?:[^*\n]*?\S)?)\*(?![\w*])")


def _role_text(m: re.Match) -> str:
    t = m.group(1)
    role = m.group(0)[1:m.group(0).index(":", 1)]
    if role in ("pep", "rfc") and t.strip().isdigit():
        return f"{role.upper()} {t.strip()}"
    mm = re.match(r"^(.*?)\s*<[^<>]*>$", t, re.S)
    if mm and mm.group(1):
        t = mm.group(1)
    return t.lstrip("~!")


def inline(s: str) -> str:
    s = ROLE.sub(_role_text, s)
    s = LITERAL.sub(r"\1", s)
    s = LINK.sub(r"\1", s)
    s = REFWORD.sub(r"\1", s)
    s = STRONG.sub(r"\1", s)
    s = EMPH.sub(r"\1", s)
    s = re.sub(r"\|(\w+)\|", r"\1", s).replace("\\ ", "")
    return s


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _literal_block(lines: list[str], i: int, ind: int, out: list[str]) -> int:
    """Consume the literal block indented deeper than ``ind`` starting at line
    ``i`` (blank lines included); append it to ``out`` as one marked entry."""
    n = len(lines)
    body = []
    while i < n and (not lines[i].strip() or _indent(lines[i]) > max(ind, 0)):
        body.append(lines[i].rstrip())
        i += 1
    while body and not body[-1]:
        body.pop()
    while body and not body[0]:
        body.pop(0)
    if body:
        base = min(_indent(b) for b in body if b)
        out += ["", CODE_MARK + "\n".join(b[base:] for b in body), ""]
    return i


def clean_rst(text: str) -> str:
    """Turn one reST document into plain text paragraphs."""
    lines = text.expandtabs(8).splitlines()
    out: list[str] = []  # logical lines; "" = paragraph break
    i, n = 0, len(lines)
    while i < n:
        line = lines[i].rstrip()
        if ADORN.match(line) and len(line.strip()) >= 3:
            i += 1
            continue
        m = DIRECTIVE.match(line)
        if m or COMMENT_OR_TARGET.match(line):
            ind = len((m or COMMENT_OR_TARGET.match(line)).group(1))
            name = m.group(2) if m else ""
            arg = m.group(3).strip() if m else ""
            i += 1
            # option fields right after the directive
            while i < n and FIELD.match(lines[i]):
                i += 1
            drop_body = (not m) or name in DROP_BODY
            if m and not drop_body:
                if name in SIG_DIRECTIVES:
                    out += ["", inline(arg), ""]
                    # continuation signatures
                    while i < n and lines[i].strip() and _indent(lines[i]) > ind and \
                            not lines[i].strip().endswith(".") and _indent(lines[i]) <= ind + 12 \
                            and re.match(r"^\s+[\w.]+\(", lines[i]):
                        out.append(inline(lines[i].strip()))
                        i += 1
                elif name in LABELLED:
                    out += ["", (LABELLED[name] + " " + inline(arg)).strip()]
                elif name in VERSIONED:
                    ver = arg.split()[0] if arg else ""
                    out += ["", VERSIONED[name].format(ver)]
                elif name in ("code-block", "sourcecode", "code", "doctest",
                              "productionlist", "parsed-literal"):
                    i = _literal_block(lines, i, ind, out)
                else:
                    if arg:
                        out += ["", inline(arg)]
                continue
            # drop the indented body
            while i < n and (not lines[i].strip() or _indent(lines[i]) > ind):
                if lines[i].strip() and _indent(lines[i]) <= ind:
                    break
                i += 1
            out.append("")
            continue
        if FIELD.match(line) and out and out[-1] == "":
            i += 1
            continue
        out.append(line)
        i += 1
        if line.endswith("::") and (i >= n or not lines[i].strip()):
            i = _literal_block(lines, i, _indent(line) if line.strip() != "::" else -1, out)

    # group into paragraphs; literal (indented after '::') blocks keep newlines
    paras: list[str] = []
    block: list[str] = []
    literal_next = False

    def flush():
        nonlocal block, literal_next
        if not block:
            return
        base = min(_indent(b) for b in block)
        first = block[0].strip()
        is_code = literal_next or first.startswith(">>>") or first.startswith("$ ")
        if is_code:
            body = "\n".join(b[base:] for b in block)
        else:
            body = " ".join(b.strip() for b in block)
            body = re.sub(r"\s+", " ", body)
        body = inline(body) if not is_code else body.replace("``", "")
        ends_colons = body.rstrip().endswith("::")
        if ends_colons:
            body = re.sub(r"\s*::$", ":", body.rstrip()) if not body.rstrip() == "::" else ""
            if body.endswith(" :"):
                body = body[:-2] + ":"
        if body.strip():
            paras.append(body.rstrip())
        literal_next = ends_colons
        block = []

    for ln in out:
        if ln.startswith(CODE_MARK):
            flush()
            paras.append(ln[len(CODE_MARK):].replace("``", ""))
            literal_next = False
        elif not ln.strip():
            flush()
        else:
            if block and not literal_next and re.match(r"^\s*([*+-]|\d+\.|#\.)\s", ln):
                flush()  # new list item
            block.append(ln)
    flush()
    text = "\n\n".join(p for p in paras if p.strip())
    text = text.replace("\u00a0", " ")
    return text.strip()


def find_sources(src: str | None) -> tuple[str, str]:
    """Return (sources_dir, package_version)."""
    if src:
        return src, "unknown"
    ver = "unknown"
    installed = "/" + SOURCES_IN_DEB
    try:
        ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", DEB],
                             capture_output=True, text=True).stdout.strip() or ver
    except FileNotFoundError:
        pass
    if os.path.isdir(installed) and ver != "unknown":
        return installed, ver
    tmp = tempfile.mkdtemp(prefix="pydoc-")
    subprocess.run(["apt-get", "download", DEB], cwd=tmp, check=True,
                   stdout=subprocess.DEVNULL)
    deb = glob.glob(os.path.join(tmp, "*.deb"))[0]
    subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "x")], check=True)
    ver = os.path.basename(deb).split("_")[1].replace("%2b", "+")
    return os.path.join(tmp, "x", SOURCES_IN_DEB), ver


def train_tokenizer(train_txt: str, prefix: str, vocab: int) -> None:
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        input=train_txt, model_prefix=prefix, model_type="bpe",
        vocab_size=vocab, character_coverage=0.9995,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        max_sentence_length=8192, input_sentence_size=2_000_000,
        shuffle_input_sentence=True, num_threads=2, minloglevel=2,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", help="html/_sources dir (default: python3.11-doc)")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args(argv)

    src, ver = find_sources(args.src)
    files = sorted(glob.glob(os.path.join(src, "**", "*.rst.txt"), recursive=True))
    if not files:
        print(f"no .rst.txt under {src}", file=sys.stderr)
        return 1
    os.makedirs(os.path.join(args.out, "corpus"), exist_ok=True)
    train_docs, held_docs = [], []
    raw_bytes = 0
    for k, f in enumerate(files):
        with open(f, encoding="utf-8") as fh:
            raw = fh.read()
        raw_bytes += len(raw.encode())
        doc = clean_rst(raw)
        if len(doc) < 200:
            continue
        (held_docs if k % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else train_docs).append(
            (os.path.relpath(f, src), doc))
    train_txt = os.path.join(args.out, "corpus", "train.txt")
    with open(train_txt, "w", encoding="utf-8") as fh:
        fh.write(f"\n{DOC_SEP}\n".join(d for _, d in train_docs) + "\n")
    held_txt = os.path.join(args.out, "heldout.txt")
    with open(held_txt, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(d for _, d in held_docs) + "\n")
    # tokenizer input: one paragraph per line (literal blocks line by line)
    spm_in = os.path.join(args.out, "corpus", "spm_input.txt")
    with open(spm_in, "w", encoding="utf-8") as fh:
        for _, d in train_docs:
            for p in d.split("\n"):
                if p.strip():
                    fh.write(p + "\n")
    train_tokenizer(spm_in, os.path.join(args.out, "tokenizer"), args.vocab)
    man = {
        "source": f"Debian package {DEB} {ver}, {SOURCES_IN_DEB}/**/*.rst.txt",
        "license": "PSF License Agreement (Python documentation)",
        "files": len(files), "raw_bytes": raw_bytes,
        "train_docs": len(train_docs), "heldout_docs": [p for p, _ in held_docs],
        "train_bytes": os.path.getsize(train_txt),
        "heldout_bytes": os.path.getsize(held_txt),
        "tokenizer": {"model_type": "bpe", "vocab_size": args.vocab,
                      "byte_fallback": True, "unk": 0, "bos": 1, "eos": 2},
    }
    with open(os.path.join(args.out, "corpus", "manifest.json"), "w") as fh:
        json.dump(man, fh, indent=1)
    print(json.dumps({k: v for k, v in man.items() if k != "heldout_docs"}, indent=1))
    print("heldout docs:", len(held_docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

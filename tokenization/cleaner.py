"""The per-document cleaning of the clean stage (``tokenization/clean.py`` runs it over files).

``DocumentCleaner`` is the ``DocumentSink`` the input formats deliver to: per document, Unicode
normalisation (NFKC), control / invisible format characters removed, configurable regex rules,
whitespace normalised (runs of spaces -> one space, at most one blank line), documents longer than
``max_document_chars`` split at sentence boundaries, too-short documents dropped. A long document
is processed in ~1 MiB segments cut just before whitespace, which leaves normalisation and
whitespace handling unchanged (rules are matched within a segment, so a rule match that spans a
cut, at most once per MiB, is missed).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from common.config.data import CleanConfig

SEGMENT = 1 << 20  # characters of one long document cleaned at a time

# Control characters (C0/C1 minus the whitespace ones), lone surrogates, and invisible format
# characters that carry no text: soft hyphen, zero-width space, bidi marks/embeddings/isolates,
# word joiner, BOM, interlinear annotation. Zero-width (non-)joiners stay: emoji and scripts need them.
_CONTROL = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b\u200e\u200f\u202a-\u202e\u2060"
    "\u2066-\u2069\ufeff\ufff9-\ufffb\ud800-\udfff]+"
)
_NEWLINES = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S\n ]")  # a run, or one unusual space
_DOUBLE_SPACES = re.compile(r" {2,}")
_SPACE_NEWLINE = re.compile(r" ?\n ?")
_MANY_NEWLINES = re.compile(r"\n{3,}")
# A sentence end (terminator plus closing quotes/brackets) followed by whitespace, or a newline.
# The greedy ".*" makes match() find the last one, scanning back from the end of the window.
_LAST_SENTENCE_END = re.compile(
    r".*(?:[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*(?=\s)|\n)", re.S)


@dataclass
class SourceStats:
    """Counters of the clean stage for one source (and, summed, for all), recorded in stage.json."""

    files: int = 0
    bytes_in: int = 0
    documents_in: int = 0
    words_in: int = 0
    bytes_replaced: int = 0
    documents_split: int = 0
    dropped_empty: int = 0
    dropped_duplicates: int = 0
    documents_out: int = 0
    words_out: int = 0
    chars_out: int = 0

    def add(self, other: "SourceStats") -> None:
        """Add ``other``'s counters to these."""
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


def count_words(text: str) -> int:
    """Whitespace-separated words of whitespace-normalised text (single spaces/newlines, at
    most one blank line), without building the list that ``len(text.split())`` would."""
    core = text.strip(" \n")
    if not core:
        return 0
    return core.count(" ") + core.count("\n") - core.count("\n\n") + 1


class Rules:
    """The regex rules of ``clean.rules``, compiled once, and the ones that apply to each source."""

    def __init__(self, cfg: CleanConfig):
        self.rules = [(re.compile(r.pattern), r.replacement, set(r.sources)) for r in cfg.rules]
        self._cache: dict[str, list] = {}

    def for_source(self, source: str) -> list:
        """(pattern, replacement) of the rules for ``source`` (all sources when a rule names none)."""
        if source not in self._cache:
            self._cache[source] = [(p, rep) for p, rep, srcs in self.rules if not srcs or source in srcs]
        return self._cache[source]


class DocumentCleaner:
    """Cleans one document at a time, fed as text segments; emits finished documents (the
    ``DocumentSink`` the input formats deliver to)."""

    def __init__(self, cfg: CleanConfig, emit: Callable[[str], None]):
        self.cfg = cfg
        self.emit = emit
        self.form = None if cfg.unicode_normalization == "none" else cfg.unicode_normalization
        self.rules: list = []
        self.stats = SourceStats()

    def add_bytes(self, n: int) -> None:
        """Count ``n`` bytes read."""
        self.stats.bytes_in += n

    def start(self) -> None:
        """Begin a document."""
        self.raw = ""  # decoded input not yet cleaned
        self.out = ""  # cleaned text not yet emitted as a document
        self.pos = 0  # start of the unemitted part of self.out
        self.pending_ws = ""  # whitespace held back between two cleaned segments
        self.started = False  # any non-whitespace text in this document yet
        self.split = False

    def feed(self, text: str) -> None:
        """Append a piece of the current document (cleaned segment by segment)."""
        raw = self.raw + text if self.raw else text
        pos = 0  # an index rather than re-slicing keeps a huge single feed linear
        while len(raw) - pos > 2 * SEGMENT:
            cut = self._safe_cut(raw, pos, pos + SEGMENT)
            self._clean_segment(raw[pos:cut])
            pos = cut
        self.raw = raw[pos:] if pos else raw

    def end(self) -> None:
        """Finish the current document: its last segment, its last piece."""
        if self.raw:
            self._clean_segment(self.raw)
            self.raw = ""
        self.stats.documents_in += 1
        self._split(final=True)

    @staticmethod
    def _safe_cut(text: str, lo: int, near: int) -> int:
        """A cut in (lo, near] at the start of a whitespace run, else before a non-mark."""
        i = max(text.rfind(" ", lo + 1, near), text.rfind("\n", lo + 1, near))
        if i > lo:
            while i > lo + 1 and text[i - 1].isspace():
                i -= 1
            if not text[i - 1].isspace():
                return i
        # No usable whitespace in a whole segment: cut where no combining mark follows.
        i = near
        while i > lo + 1 and unicodedata.category(text[i])[0] == "M":
            i -= 1
        return i

    def _clean_segment(self, seg: str) -> None:
        if self.form is not None:
            seg = unicodedata.normalize(self.form, seg)
        seg = self._normalise_whitespace(seg, controls=True)
        self.stats.words_in += count_words(seg)
        if self.rules:
            for pattern, replacement in self.rules:
                seg = pattern.sub(replacement, seg)
            seg = self._normalise_whitespace(seg, controls=False)
        core = seg.strip(" \n")
        if not core:
            self.pending_ws += seg
            return
        lead = seg[: len(seg) - len(seg.lstrip(" \n"))]
        trail = seg[len(seg.rstrip(" \n")):]
        ws = self.pending_ws + lead
        if self.started and ws:
            # The same result as normalising the two segments' whitespace run in one piece.
            n = ws.count("\n")
            self.out += "\n\n" if n >= 2 else "\n" if n == 1 else " "
        self.out += core
        self.pending_ws = trail
        self.started = True
        self._split(final=False)

    def _normalise_whitespace(self, seg: str, controls: bool) -> str:
        # Regexes scan at ~40 MB/s while isprintable(), `in` and replace() run at GB/s, so the
        # common characters (tab, CR, newline) are handled with the latter and the regexes run
        # only when other control or format characters are present.
        if seg.isprintable():
            return _DOUBLE_SPACES.sub(" ", seg) if "  " in seg else seg
        if "\r" in seg:
            seg = seg.replace("\r\n", "\n").replace("\r", "\n")
        if "\t" in seg:
            seg = seg.replace("\t", " ")
        has_newline = "\n" in seg
        if not (seg.replace("\n", "") if has_newline else seg).isprintable():
            if controls:
                seg = _NEWLINES.sub("\n", seg)
                seg = _CONTROL.sub("", seg)
            seg = _SPACES.sub(" ", seg)
            has_newline = "\n" in seg
        elif "  " in seg:
            seg = _DOUBLE_SPACES.sub(" ", seg)
        if has_newline:
            if not self.cfg.keep_newlines:
                return _DOUBLE_SPACES.sub(" ", seg.replace("\n", " "))
            seg = _SPACE_NEWLINE.sub("\n", seg)
            if "\n\n\n" in seg:
                seg = _MANY_NEWLINES.sub("\n\n", seg)
        return seg

    def _split(self, final: bool) -> None:
        limit = self.cfg.max_document_chars
        out, pos = self.out, self.pos
        while len(out) - pos > limit:
            cut = self._split_point(out, pos, pos + limit)
            self._emit(out[pos:cut])
            pos = cut
            self.split = True
        if final:
            if pos < len(out):
                self._emit(out[pos:])
            elif not self.started:
                self.stats.dropped_empty += 1
            if self.split:
                self.stats.documents_split += 1
            self.out, self.pos = "", 0
        else:
            self.out, self.pos = out[pos:], 0

    @staticmethod
    def _split_point(text: str, start: int, end: int) -> int:
        """Where to end a piece of text[start:end+1]: after the last sentence end in its second
        half, else at its last whitespace, else at ``end`` (a hard cut)."""
        half = start + (end - start) // 2
        m = _LAST_SENTENCE_END.match(text, half, end)
        if m is not None and m.end() > start:
            return m.end()
        i = max(text.rfind(" ", start + 1, end + 1), text.rfind("\n", start + 1, end + 1))
        if i > start:
            return i
        while end > start + 1 and unicodedata.category(text[end])[0] == "M":
            end -= 1
        return end

    def _emit(self, text: str) -> None:
        text = text.strip(" \n")
        if len(text) < self.cfg.min_document_chars:
            self.stats.dropped_empty += 1
            return
        self.emit(text)


__all__ = ["DocumentCleaner", "Rules", "SEGMENT", "SourceStats", "count_words"]

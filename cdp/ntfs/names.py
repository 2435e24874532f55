"""NTFS names as cdp keeps them: exact, including lone surrogates.

An NTFS name is a sequence of UTF-16 code units, and nothing requires them to pair up:
a lone surrogate (U+D800..U+DFFF) is a legal name character (Windows and ntfs-3g both
create such names). Three forms, converted without loss:

* **exact** (:func:`exact`): the name as Python text, lone surrogates as themselves
  (``'a\\udc00b'``; ``utf-16-le`` with ``surrogatepass`` gives the on-disk units back).
  What the operations return, ``--json`` writes (``"a\\udc00b"``) and the command line
  takes: an argument given as WTF-8 bytes, as bash's ``$'a\\udc00b'`` produces, is read
  back into it (:func:`from_argv`). Printed escaped, so one name stays one line.
* **stored** (:func:`decode_name`, what the parser returns and the catalog's SQLite
  holds, which cannot store lone surrogates): the exact text with each lone surrogate
  ``U+D800 + k`` written as the one character ``U+10F800 + k`` (the top of plane 16's
  private use area), and a real character of ``U+10F7FF..U+10FFFF`` written with
  ``U+10F7FF`` before it. Names without either (all names in practice) are the same in
  both forms, so catalogs keep their keys; the mapping is one-to-one both ways.

Cost: a names-only check (``str.isascii``, then one regex search) for the common name.
"""

from __future__ import annotations

import os
import re

_ESC = "\U0010f7ff"  #: before a real character of the reserved range (stored form)
_BASE = 0x10F800  #: U+10F800 + k stands for the lone surrogate U+D800 + k (stored form)
_SURROGATE = 0xD800

_EXACT_SPECIAL = re.compile("[\ud800-\udfff\U0010f7ff-\U0010ffff]")
_STORED_SPECIAL = re.compile("[\U0010f7ff-\U0010ffff]")


def _to_stored(m: re.Match[str]) -> str:
    c = m.group()
    o = ord(c)
    if o < 0xE000:  # a lone surrogate
        return chr(_BASE + o - _SURROGATE)
    return _ESC + c


def stored(name: str) -> str:
    """The stored form of an exact name (identity unless it has a lone surrogate or a
    character of the reserved range)."""
    if name.isascii() or not _EXACT_SPECIAL.search(name):
        return name
    return _EXACT_SPECIAL.sub(_to_stored, name)


def exact(name: str) -> str:
    """The exact name of a stored one (the inverse of :func:`stored`)."""
    if name.isascii() or not _STORED_SPECIAL.search(name):
        return name
    out: list[str] = []
    escaped = False
    for c in name:
        o = ord(c)
        if escaped:
            out.append(c)
            escaped = False
        elif c == _ESC:
            escaped = True
        elif o >= _BASE:
            out.append(chr(_SURROGATE + o - _BASE))
        else:
            out.append(c)
    return "".join(out)


def decode_name(raw: bytes | bytearray) -> str:
    """UTF-16LE name units -> the stored form (lossless, see the module notes)."""
    return stored(raw.decode("utf-16-le", "surrogatepass"))


def from_argv(arg: str) -> str:
    """A command-line name as exact text: the argument's bytes read as WTF-8 (UTF-8 that
    may encode surrogates, as ``$'\\udc00'`` in bash gives), else the text unchanged."""
    if arg.isascii():
        return arg
    try:
        return os.fsencode(arg).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return arg


def shown(name: str) -> str:
    """A name for one line of output: as is when printable, else quoted with escapes
    (``'new\\nline'``, ``'a\\udc00b'``), which bash reads back as ``$'...'``."""
    return name if name.isprintable() else repr(name)

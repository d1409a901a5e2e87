"""Find literal secrets in loaded job specs and cluster profiles, and quote user values safely.

`secret_paths(data)` lists the dotted paths (`env.hfToken`, `a.b[2]`) of values that must not be written
into a spec: anything non-empty under a secret-looking key that is not exactly a reference `${env:VAR}`
or `${file:PATH}`, and any string anywhere that has the shape of a well-known credential (Hugging Face,
GitHub, OpenAI, AWS, Slack tokens, PEM private keys). `redact` and `safe_quote` make a user's value fit
for an error message. No returned string ever contains a refused value. Nothing here imports torch.

Key rule. A key is split into words on camelCase humps, `_`, `-`, `.` and spaces, then lower-cased.
  * Always secret: a word in STRONG_WORDS (password, passwd, pwd, secret(s), credential(s), apikey, pat,
    bearer, authorization), or a key whose joined lower-case form contains apikey / accesskey /
    secretkey / password / passwd (`PGPASSWORD`, `AWS_SECRET_ACCESS_KEY`, `x-api-key`).
  * Secret unless qualified: a word in WEAK_WORDS (token, key, auth, private) or a word containing
    `token` (`hfToken`, `HFTOKEN`). The plural `tokens` and `tokeniz*`/`tokenis*` are not secrets
    (`max_new_tokens`, `tokenizer_path`); a key that also has a count, id, size or vocabulary-role word
    from QUALIFIERS is a model setting, not a secret (`eos_token_id`, `pad_token`, `num_key_value_heads`).
  * `key` counts only as a whole word: `monkey` and `keyboard_layout` are not secret.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any

STRONG_WORDS = {"password", "passwords", "passwd", "pwd", "secret", "secrets", "credential", "credentials",
                "apikey", "pat", "bearer", "authorization"}
STRONG_SUBSTRINGS = ("apikey", "accesskey", "secretkey", "password", "passwd")
WEAK_WORDS = {"token", "key", "auth", "private"}
QUALIFIERS = {"id", "ids", "num", "n", "max", "min", "count", "len", "length", "size", "dim", "heads", "limit",
              "budget", "bos", "eos", "pad", "unk", "sep", "cls", "mask", "special", "vocab", "type"}
REFERENCE = re.compile(r"\$\{env:[A-Za-z_][A-Za-z0-9_]*\}|\$\{file:[^{}\x00-\x1f]+\}")
TOKEN_SHAPES = re.compile("|".join([
    r"\bhf_[A-Za-z0-9]{30,}",                                    # Hugging Face
    r"\b(?:gh[oprsu]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})",  # GitHub
    r"\bsk-[A-Za-z0-9_-]{20,}",                                  # OpenAI-style
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",                            # AWS access key id
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",                           # Slack
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*)",  # PEM block
]), re.S)
HIDDEN = "<hidden>"
_BENIGN_TOKEN = re.compile(r"tokens|tokeni[sz]\w*")
_HUMPS = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[_\-.\s]+")
_INDEX = re.compile(r"(\[\d+\])+$")


def key_words(key: Any) -> list[str]:
    """The lower-cased words of a key: `hfToken` -> ['hf', 'token'], `AWS_SECRET` -> ['aws', 'secret']."""
    return [w.lower() for w in _SEPARATORS.split(_HUMPS.sub(" ", str(key))) if w]


def is_secret_key(key: Any) -> bool:
    """Whether a value under `key` must be a reference, by the rule in the module docstring."""
    words = key_words(key)
    if set(words) & STRONG_WORDS or any(s in "".join(words) for s in STRONG_SUBSTRINGS):
        return True
    weak = any(w in WEAK_WORDS or "token" in _BENIGN_TOKEN.sub("", w) for w in words)
    return weak and not set(words) & QUALIFIERS


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict, tuple, set)) and not
                             (value.strip() if isinstance(value, str) else value))


def _has_token(value: Any) -> bool:
    if isinstance(value, str):
        return TOKEN_SHAPES.search(value) is not None
    if isinstance(value, dict):
        return any(_has_token(k) or _has_token(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return any(_has_token(v) for v in value)
    return False


def _key_text(key: Any) -> str:
    return HIDDEN if _has_token(str(key)) else _escape(str(key))


def secret_paths(data: Any) -> list[str]:
    """Paths of literal secrets: non-reference values under secret keys, token-shaped strings anywhere.
    A list or mapping under a secret key is reported once, as a whole; cyclic data is walked once."""
    found: list[str] = []
    stack: list[tuple[str, Any, Any, tuple]] = [("", None, data, ())]
    while stack:
        path, key, value, ancestors = stack.pop()
        if key is not None and is_secret_key(key) and not _is_empty(value) and not (
                isinstance(value, str) and REFERENCE.fullmatch(value)):
            found.append(path)
            continue
        if (key is not None and _has_token(str(key))) or (isinstance(value, str) and _has_token(value)):
            found.append(path)
        if id(value) in ancestors:
            continue
        if isinstance(value, dict):
            kids = [(f"{path}.{_key_text(k)}" if path else _key_text(k), k, v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            kids = [(f"{path}[{i}]", None, v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend((p, k, v, ancestors + (id(value),)) for p, k, v in reversed(kids))
    return found


def _escape(text: str) -> str:
    def one(c: str) -> str:
        if c in "\n\r\t":
            return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c]
        if c == "\\" or unicodedata.category(c)[0] != "C":
            return c
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
    return "".join(one(c) for c in text)


def redact(value: Any, limit: int = 60) -> str:
    """`value` fit for an error message: token shapes hidden, control characters escaped, at most `limit`
    characters (a cut value ends in '…'). No quotes are added."""
    text = value if isinstance(value, str) else repr(value)
    text = TOKEN_SHAPES.sub(HIDDEN, text)
    pieces, size = [], 0
    for c in text:
        piece = _escape(c)
        if size + len(piece) > limit:
            while pieces and size + 1 > limit:
                size -= len(pieces.pop())
            return "".join(pieces) + "…"
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def safe_quote(path: str, value: Any) -> str:
    """`<hidden>` when any key on `path` is secret-looking or `value` holds a token shape, else redact(value)."""
    keys = [_INDEX.sub("", seg) for seg in path.split(".")]
    if _has_token(value) or any(k and is_secret_key(k) for k in keys):
        return HIDDEN
    return redact(value)

"""Session parameters that follow a client from one server connection to the next."""

from __future__ import annotations

from collections.abc import Mapping

# The GUC_REPORT parameters a client can change and rely on: PostgreSQL reports each
# change with ParameterStatus, so the proxy always knows both the client's and the
# server's values and can SET the difference when a transaction lands on another server.
TRACKED = frozenset(
    (
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "IntervalStyle",
        "standard_conforming_strings",
        "application_name",
    )
)

# Startup parameters are case-sensitive on the wire, GUC names are not.
_CANONICAL = {name.lower(): name for name in TRACKED}


def canonical(name: str) -> str | None:
    """The tracked spelling of a parameter name, or None when it is not tracked."""
    return _CANONICAL.get(name.lower())


# PostgreSQL's encoding names (pg_enc2name_tbl) and the other spellings it accepts
# (pg_encname_tbl), keyed as PostgreSQL compares them: lower case, letters and digits only.
_ENCODINGS = (
    "SQL_ASCII", "EUC_JP", "EUC_CN", "EUC_KR", "EUC_TW", "EUC_JIS_2004", "UTF8", "MULE_INTERNAL", "LATIN1",
    "LATIN2", "LATIN3", "LATIN4", "LATIN5", "LATIN6", "LATIN7", "LATIN8", "LATIN9", "LATIN10", "WIN1256",
    "WIN1258", "WIN866", "WIN874", "KOI8R", "WIN1251", "WIN1252", "ISO_8859_5", "ISO_8859_6", "ISO_8859_7",
    "ISO_8859_8", "WIN1250", "WIN1253", "WIN1254", "WIN1255", "WIN1257", "KOI8U", "SJIS", "BIG5", "GBK",
    "UHC", "GB18030", "JOHAB", "SHIFT_JIS_2004",
)  # fmt: skip
_ENCODING_ALIASES = {
    "abc": "WIN1258", "tcvn": "WIN1258", "tcvn5712": "WIN1258", "vscii": "WIN1258", "alt": "WIN866",
    "iso88591": "LATIN1", "iso88592": "LATIN2", "iso88593": "LATIN3", "iso88594": "LATIN4",
    "iso88599": "LATIN5", "iso885910": "LATIN6", "iso885913": "LATIN7", "iso885914": "LATIN8",
    "iso885915": "LATIN9", "iso885916": "LATIN10", "koi8": "KOI8R", "mskanji": "SJIS", "shiftjis": "SJIS",
    "win932": "SJIS", "unicode": "UTF8", "win": "WIN1251", "win936": "GBK", "win949": "UHC", "win950": "BIG5",
}  # fmt: skip


def _encoding_key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isascii() and c.isalnum())


_ENCODING_BY_KEY = {_encoding_key(name): name for name in _ENCODINGS} | _ENCODING_ALIASES
# Every winNNN is also windowsNNN.
_ENCODING_BY_KEY |= {
    "windows" + k[3:]: name for k, name in _ENCODING_BY_KEY.items() if k[:3] == "win" and k[3:].isdigit()
}

_DATE_STYLES = {"iso": "ISO", "sql": "SQL", "german": "German"}
_DATE_ORDERS = {"ymd": "YMD", "dmy": "DMY", "mdy": "MDY", "us": "MDY"}
_INTERVAL_STYLES = frozenset(("postgres", "postgres_verbose", "sql_standard", "iso_8601"))
_BOOL = {"on": "on", "true": "on", "yes": "on", "1": "on", "off": "off", "false": "off", "no": "off", "0": "off"}


def _datestyle(value: str, current: str) -> str | None:
    """DateStyle as PostgreSQL reports it (check_datestyle), or None for what it would refuse."""
    style, _, order = (part.strip() for part in current.partition(","))
    have_style = have_order = False
    for raw in value.split(","):
        token = raw.strip().lower()
        new_style = new_order = None
        if token in _DATE_STYLES:
            new_style = _DATE_STYLES[token]
        elif token.startswith("postgres"):
            new_style = "Postgres"
        elif token in _DATE_ORDERS:
            new_order = _DATE_ORDERS[token]
        elif token.startswith("noneuro"):
            new_order = "MDY"
        elif token.startswith("euro"):
            new_order = "DMY"
        else:
            return None  # DEFAULT, quoting, or an error: the server's own report settles it
        if new_style is not None:
            if have_style and new_style != style:
                return None
            style, have_style = new_style, True
            if new_style == "German" and not have_order:
                order = "DMY"
        if new_order is not None:
            if have_order and new_order != order:
                return None
            order, have_order = new_order, True
    return f"{style}, {order}"


def reported_value(name: str, value: str, current: str | None) -> str:
    """The value PostgreSQL would report for a client's startup `value` of tracked `name`.

    A login is greeted with what the server would say (drivers parse DateStyle and
    client_encoding); spellings this cannot settle (time zones) are passed on as given,
    and corrected by the server's own ParameterStatus on the client's first transaction.
    """
    if name == "client_encoding":
        return _ENCODING_BY_KEY.get(_encoding_key(value), value)
    if name == "DateStyle" and current:
        return _datestyle(value, current) or value
    if name == "IntervalStyle" and value.lower() in _INTERVAL_STYLES:
        return value.lower()
    if name == "standard_conforming_strings":
        return _BOOL.get(value.lower(), value)
    return value


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sync_statement(client: Mapping[str, str], server: Mapping[str, str]) -> str | None:
    """SQL that makes the server's tracked parameters equal the client's, or None."""
    sets = [f'SET "{name}" = {quote_literal(value)}' for name, value in client.items() if server.get(name) != value]
    return ";".join(sets) if sets else None


def split_options(options: str) -> list[tuple[str, str]]:
    """The settings in a startup packet's `options`, split as PostgreSQL does (pg_split_opts).

    Words are separated by spaces, a backslash escapes the next character; each setting
    is `-c name=value`, `-cname=value` or `--name=value` (dashes in a name mean
    underscores). Raises ValueError for anything else (other server switches).
    """
    words: list[str] = []
    word: list[str] = []
    escaped = False
    for char in options:
        if escaped:
            word.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(char)
    if word:
        words.append("".join(word))
    settings = []
    it = iter(words)
    for word_ in it:
        if word_ == "-c":
            setting = next(it, "")
        elif word_.startswith("-c") or word_.startswith("--"):
            setting = word_[2:]
        else:
            raise ValueError(f"unsupported switch in options: {word_}")
        name, equals, value = setting.partition("=")
        if not name or not equals:
            raise ValueError(f"-c {setting} requires a value")
        settings.append((name.replace("-", "_"), value))
    return settings


def set_config_statement(settings: Mapping[str, str]) -> str:
    """SQL that sets these (untracked) parameters for the session, values taken as given.

    set_config, not SET: a startup value is one string (`search_path=a,b` is two schemas;
    `SET search_path = 'a,b'` would be one).
    """
    calls = ", ".join(
        f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
        for name, value in settings.items()
    )
    return f"SELECT {calls}"


def reset_statement(names: tuple[str, ...]) -> str:
    return ";".join('RESET "' + name.replace('"', '""') + '"' for name in names)

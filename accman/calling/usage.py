"""The command line's usage errors: one line, exit code 2, and no word of
the command line echoed in them but the names of flags and commands, a
number given to a flag that takes numbers and a short lowercase word
given to a flag of a few choices (docs/CALLING.md: a credential is never
echoed).  Only the echoes are put out of sight: AccMan's and
argparse's own words stay whole, whatever words were given."""

import argparse
import difflib
import re
import sys

from accman.calling.commands import EXIT_OK, EXIT_USAGE, stdout_failed
from accman.calling.output import say, to_stdout
from accman.calling.replies import UNSHOWN     # in place of a word a usage error does not echo


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2, and shows no
    word of the command line (`given`) but the exact names of flags and
    commands (`names`, shared by a parser and its commands) and the
    numbers of _shown_values: any other word may be a credential, which is
    never echoed (docs/CALLING.md)."""

    # Said with every usage error of a command that takes a credential.
    cred_hint = None

    def __init__(self, *args, given=(), names=None, **kwargs):
        self.given = given
        self.names = set() if names is None else names
        self.flags = []         # this parser's own, for "did you mean"
        super().__init__(*args, allow_abbrev=False, **kwargs)   # --tok is no --token

    def add_argument(self, *args, **kwargs):
        flags = [a for a in args if a.startswith("-")]
        self.names.update(flags)
        self.flags += flags
        if flags and kwargs.get("action", "store") == "store":
            kwargs["action"] = _Once        # a value, taken once

        return super().add_argument(*args, **kwargs)

    def error(self, message):
        """argparse's usage error, `message`, said with the words of the
        command line that it echoes out of sight (_unechoed)."""
        choices = _choices_said(message, self._actions)
        unechoed, hidden = _unechoed(message.removesuffix(choices), self.given, self.names,
                                     self._shown_values())
        self._refuse(unechoed + choices, hidden,
                     _dashed_value_flag(message, self.given, self.names))

    def _refuse(self, message, hidden, dashed=None):
        """Says `message`, in which `hidden` words were put out of sight, and
        exits with EXIT_USAGE."""
        hint = (f"; a value that starts with '-' goes after '=': {dashed}=VALUE" if dashed
                else f"; {self.cred_hint}" if self.cred_hint else "")
        if hidden:
            message += " (a value that may be a credential is not shown)"
        sys.exit(say(f"accman: error: {message} (try: {self.prog} --help{hint})", EXIT_USAGE))

    def _shown_values(self) -> set:
        """The words given that a usage error of this command shows
        (_shown_values): numbers given to its own VALUE_SHOWN_FLAGS, and
        short lowercase words given to a flag of its own that takes one of
        a few words (`--verify none`: a typo of one, never a generated
        credential)."""
        choosing = {flag for action in self._actions if action.choices
                    for flag in action.option_strings}
        return (_shown_values(self.given, VALUE_SHOWN_FLAGS.intersection(self.flags),
                              _NUMBER_SHAPE_RE)
                | _shown_values(self.given, choosing, _CHOICE_SHAPE_RE))

    def _print_message(self, message, file=None):
        """--help and --version, whose output is the answer: argparse drops
        an error of that write (exit 0 with nothing printed).  A stdout that
        fails (a full disk, or closed from the start) is said on stderr,
        with stdout_failed's code, at once; one whose reader closed it is a
        reader that wants no more, as for every command."""
        if not message or (file is not None and file is not sys.stdout):
            return super()._print_message(message, file)
        e = to_stdout(message.removesuffix("\n"))
        words, code = (None, EXIT_OK) if e is None else stdout_failed(e)
        if code != EXIT_OK:
            sys.exit(say(f"accman: {words}", code))
        return None

    def no_command(self, extra):
        """No command was given: the flags that no argument took are said
        as unrecognized, the closest suggested (`accman --verison`), where
        argparse's own "required" error would leave them unsaid, and that a
        command is required, naming the commands: a command's flag given
        without its command (`accman --token=T`) is no option of accman,
        where the mistake may be the command left out.  Without any, that
        a command is missing."""
        unknown = [word for word in extra if word != "--"]     # `accman --`: nothing unknown
        if unknown:
            commands = [name for action in self._actions
                        if isinstance(action, argparse._SubParsersAction)
                        for name in action.choices]
            self.unrecognized(unknown, f"; a COMMAND is required: {', '.join(commands)}")
        self.error("the following arguments are required: COMMAND")

    def unrecognized(self, extra, also=""):
        """The usage error for the words that no argument took: none shown,
        and for those that read as flags, the closest of this command's;
        `also` (AccMan's own words) is said before that.  The first
        UNRECOGNIZED_LISTED_MAX are listed, each as _echoed says it, then
        how many more."""
        own = [f for f in self.flags if f.startswith("--")]
        others = _flags_in(extra, self.given, self.names - set(own))
        close = _close_flags(extra, self.given, own, set(others))
        values = self._shown_values()
        words = extra[:UNRECOGNIZED_LISTED_MAX]
        listed = [_echoed(word, self.names, values) for word in words]
        hidden = sum(said != word for said, word in zip(listed, words, strict=True))
        more = len(extra) - UNRECOGNIZED_LISTED_MAX
        self._refuse(f"unrecognized arguments: {' '.join(listed)}" +
                     (f" and {more} more" if more > 0 else "") +
                     (f"; {' and '.join(others)} {'is' if len(others) == 1 else 'are'} not "
                      f"{'an option' if len(others) == 1 else 'options'} of {self.prog}"
                      if others else "") + also +
                     (f"; did you mean {' or '.join(close)}?" if close else ""), hidden)


# The most words that no argument took that a usage error lists (each as
# <not shown>, or a flag's name): a message as long as a command line of
# thousands of words (`accman tot $(cat creds)`) is no help to read.
UNRECOGNIZED_LISTED_MAX = 8
# The most words a command line may have (after `accman`).  The longest
# command, `serve` with every flag, is 23 words and two more per --store of
# a store of several clusters: 256 leaves room for a store of over a hundred.
# argparse's cost grows as the square of the words that start with "-" (a
# command line of 20000 such took seconds to refuse), so a longer one is
# refused before it is parsed.
ARGV_WORDS_MAX = 256


_MISSING_VALUE_RE = re.compile(r"argument (--[a-z-]+): expected one argument")


def _dashed_value_flag(message, given, names) -> str | None:
    """The flag of argparse's "expected one argument" when the command line
    gives it a word that starts with "-" and is no flag of `names`
    (`--token -Xy...`, `--key -k1`: a token or a key may start so), which
    argparse takes for a flag: such a value is written `--token=-Xy...`.
    None for any other error, and for a value left out (`--key --url U`)."""
    m = _MISSING_VALUE_RE.fullmatch(message)
    if m is None:
        return None
    options = _options(given)
    after = [given[i + 1] for i, word in enumerate(options)
             if word == m.group(1) and i + 1 < len(given)]
    return m.group(1) if any(w.startswith("-") and w != "--" and w.split("=", 1)[0] not in names
                             for w in after) else None


# Where a namespace keeps the flags it was given, for _Once.
_GIVEN = "_flags_given"


class _Once(argparse.Action):
    """A flag that takes a value, which it takes once: given twice
    (`--key k1 ... --key k2`, `--data /a ... --data /b`), argparse keeps the
    last without a word, and which one was meant is not known.  Refused as
    the wire refuses a parameter given twice (SPEC "Values"); --store, which
    names one cluster a time, is given once for each."""

    def __call__(self, _parser, namespace, values, _option_string=None):
        given = namespace.__dict__.setdefault(_GIVEN, set())
        if self.dest in given:
            # No value named: which one was meant is not known.
            raise argparse.ArgumentError(self, "given more than once: give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


# How alike an unknown word that reads as a flag must be to a flag's name
# for a usage error to suggest that flag (difflib's ratio; --tokn is 0.92
# from --token).  The suggestion is the flag's own name, never the word.
FLAG_LIKENESS_MIN = 0.6


def _options(given) -> list:
    """The words of `given` before any "--": after it every word is a value."""
    return given[:given.index("--")] if "--" in given else given


def _flags_in(extra, given, flags) -> list:
    """The words of `extra` that read as flags (they start with "-" and come
    before any "--", after which every word is a value) and name one of
    `flags` exactly (another command's: `tot --key`), each named once."""
    options = set(_options(given))
    return list(dict.fromkeys(word.split("=", 1)[0] for word in extra
                              if word.startswith("-") and word in options
                              and word.split("=", 1)[0] in flags))


def _close_flags(extra, given, flags, others) -> list:
    """For each word of `extra` that reads as a flag and names none of
    `others`, the closest of `flags`, if one is close enough; each named
    once."""
    options = set(_options(given))
    close = [difflib.get_close_matches(word.split("=", 1)[0], flags, 1, FLAG_LIKENESS_MIN)
             for word in extra if word.startswith("-") and word in options
             and word.split("=", 1)[0] not in others]
    return list(dict.fromkeys(flag for match in close for flag in match))


# Flags that take numbers (a port, an amount, a duration, an address): a
# usage error shows their value when it has a number's shape, so that a
# typo can be seen.  A value of another shape is a mistake of another kind
# (a variable swapped in a script) and may be a secret: not shown.
VALUE_SHOWN_FLAGS = frozenset({
    "--port", "--host", "--events-retention", "--low-balance", "--compaction-nice", "--by",
    "--min", "--low", "--ttl", "--limit", "--before", "--after", "--wait"})
_NUMBER_SHAPE_RE = re.compile(r"[-+]?[0-9][0-9.]{0,11}[A-Za-z]{0,2}")   # 99999, 5w, 127.0.0.1
# A word given to a flag of a few choices is shown when it has their shape:
# lowercase, short (`accman open` makes 32 characters of three cases).
_CHOICE_SHAPE_RE = re.compile(r"[a-z][a-z0-9-]{0,11}")


def _shown_values(given, flags, shape) -> set:
    """The words of `given` of `shape` that stand only as values of
    `flags` (a word also given elsewhere may be a credential there; after
    "--" every word is a positional value)."""
    options = _options(given)
    as_value, elsewhere, after_flag = set(), set(given[len(options):]), False
    for word in options:
        name, eq, value = word.partition("=")
        if after_flag:
            as_value.add(word)
        elif name in flags and eq:
            as_value.add(value)
        elif word not in flags:
            elsewhere.update((word, value) if eq else (word,))
        after_flag = word in flags
    return {w for w in as_value - elsewhere if shape.fullmatch(w)}


def _glued_to_short_flag(word, names) -> list:
    """What argparse may read as the value of a one-letter flag of `names`
    that `word` starts with (`-hX3k` or `-h=X3k`: "X3k"), and quotes when
    that flag takes none: the rest of a credential that starts with "-h".
    A first letter of that rest that names a one-letter flag too is read as
    that flag, and the rest after it is quoted instead (`-hhX3k`: "X3k";
    `-hh=X3k`: "=X3k"), so each such rest is one, with and without "="."""
    if word.startswith("--") or len(word) <= 2 or word[:2] not in names:
        return []
    rests, rest = [], word[2:]
    while rest:
        rests += [r for r in (rest, rest.removeprefix("=")) if r]
        rest = rest[1:] if f"-{rest[0]}" in names else ""
    return rests


def _echoed(word, names, values) -> str:
    """`word` as a usage error says it: whole when it is the exact name of a
    flag or a command (of `names`) or one of `values` (_shown_values), a
    flag's name alone when it is that name and "=value", else UNSHOWN.  A
    word like a flag's name, --tokn or --tokenSECRET, is not one: it may
    hold a credential."""
    if word in names or word in values:
        return word
    name = word.partition("=")[0]
    return name if word.startswith("--") and name in names else UNSHOWN


# What follows argparse's "invalid choice: 'x'": the choices, its own words.
_CHOICES = " (choose from "


def _choices_said(message, actions) -> str:
    """The end of argparse's "invalid choice" `message` that lists the
    choices of one of `actions` (` (choose from 'full', 'heads')`), argparse's
    own words; "" for any other message.  Only that exact end, as argparse
    writes it (each choice quoted, or, in later Pythons, bare): a word given
    may hold " (choose from " too, and is then an echo like any other."""
    for action in actions:
        for shown in (repr, str) if action.choices else ():
            said = f"{_CHOICES}{', '.join(map(shown, action.choices))})"
            if message.endswith(said):
                return said
    return ""


def _unechoed(message, given, names, values) -> tuple[str, int]:
    """argparse's `message` with the words of `given` that it echoes put out
    of sight as _echoed says them, and how many were.  argparse, and the
    types of accman.calling.arguments, echo a word quoted as Python writes a
    str (`'90x'`), whole or the part after a flag's "=" or glued to a
    one-letter flag (`-hX3k`); a word is looked for in that form only, so
    that the same word in their own text (`such as 3600, 90m or 7d`) is
    left whole; the choices of "invalid choice" are not in `message`
    (_choices_said).  The words no argument took are listed by
    ArgumentParser.unrecognized, which echoes each itself."""
    hidden = 0
    for word in sorted(set(given) - {""} - values, key=len, reverse=True):
        said = _echoed(word, names, values)
        if said == word:
            continue
        out_of_sight = [(word, said)]
        value = word.partition("=")[2]
        if said != UNSHOWN and value and value not in values:
            out_of_sight.append((value, UNSHOWN))
        out_of_sight += [(glued, UNSHOWN) for glued in _glued_to_short_flag(word, names)
                         if glued not in values]
        for text, instead in out_of_sight:
            hidden += message.count(repr(text))
            message = message.replace(repr(text), repr(instead))
    return message, hidden

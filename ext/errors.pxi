# The parser's words for its errors: the error code of each status it
# answers, and the details said in more than one place.  Included by
# wire.pyx; no I/O.

CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
    501: "not_implemented",
    505: "version_not_supported",
}

# A value quoted back in an error detail is cut to this many characters: the
# detail is a sentence for a person, not an echo of the request.
cdef Py_ssize_t DETAIL_QUOTE_CHARS_MAX = 40
# A bad number is quoted back only with at most this many letters (a unit,
# an exponent): a credential of letters sent in its place is not (SPEC:
# never logged); else NOT_SHOWN is said in its place.
cdef Py_ssize_t NUMBER_LETTERS_MAX = 2
NOT_SHOWN = "(not shown: it may be a credential)"
# Refused as it comes, whichever of the two headers comes first.
AMBIGUOUS_CL_TE = "Content-Length with Transfer-Encoding is ambiguous framing"
# Indexed by whether the line is the request line.
_BARE_CR = ("a bare CR (not followed by LF) in a header line",
            "a bare CR (not followed by LF) in the request line")

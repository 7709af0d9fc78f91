# C declarations of accman.server._wire (ext/wire.pyx), for the compiled
# modules that read parsed requests at C speed (ext/pipeline.pyx).  The
# fields are documented on the class in ext/wire.pyx.

cdef class Request:
    cdef public int route
    cdef public str cred
    cdef public long long by
    cdef public object min
    cdef public str key
    cdef public long long limit
    cdef public object before
    cdef public long long ttl
    cdef public long long hold
    cdef public long long use
    cdef public long long after
    cdef public long long wait
    cdef public object low
    cdef public bytes token
    cdef public str auth_fault
    cdef public bint keep_alive
    cdef public bint http10
    cdef public bint head
    cdef public bint loopback_host
    cdef public str allow
    cdef public object error


cdef class Parser:
    cdef int _phase
    cdef unsigned char* _line       # the unfinished line, carried between feeds
    cdef const unsigned char* _cur  # the complete line being read (_complete), _cur_n bytes
    cdef Py_ssize_t _cur_n
    cdef const unsigned char* _chunk    # the bytes of this feed from the line's start on (_parse)
    cdef Py_ssize_t _chunk_n
    cdef Py_ssize_t _line_len
    cdef Py_ssize_t _line_cap
    cdef Request _req               # the request being read, from its request line
    cdef object _pending            # a non-closing HttpError for _req, replied after its head
    cdef Py_ssize_t _head_bytes     # header block bytes so far, CRLFs included
    cdef int _header_lines
    cdef int _blank_lines           # empty lines skipped before this request line
    cdef int _hosts
    cdef bint _cl_seen
    cdef bint _te_seen              # Transfer-Encoding seen: 411 or 400 at the end of the head
    cdef bint _te_chunked           # its codings end in chunked (411), else 400
    cdef Py_ssize_t _cl
    cdef Py_ssize_t _body_left
    cdef bint _conn_close
    cdef bint _conn_keep_alive
    cdef bint _auth_seen
    cdef bint _absolute             # the target named its authority: Host does not
    cdef bint _expect_continue      # Expect: 100-continue (HTTP/1.1)
    cdef bint _continue             # a 100 Continue is owed: see take_continue
    cdef bytes _rest                # fed, not yet parsed: a capped feed's remainder
    cdef Py_ssize_t _rest_at

    cdef bint pending_c(self) noexcept
    cdef bint between_requests(self) noexcept
    cdef list feed_c(self, bytes data, Py_ssize_t max_requests)
    cdef list _parse(self, bytes data, Py_ssize_t i, Py_ssize_t max_requests)
    cdef int _keep(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef int _unfinished(self, const unsigned char* p, Py_ssize_t n, list out) except -1
    cdef bint _too_long(self, const unsigned char* p, Py_ssize_t total, bint crlf,
                        list out) except -1
    cdef bint _bare_cr_in_limit(self, const unsigned char* p, Py_ssize_t n,
                                Py_ssize_t j) noexcept
    cdef int _complete(self, const unsigned char* s, Py_ssize_t total, bint crlf,
                       list out) except -1
    cdef int _request_line(self, const unsigned char* s, Py_ssize_t n, list out) except -1
    cdef object _target(self, Request req, int method, const unsigned char* s, Py_ssize_t n)
    cdef int _fail_request_line(self, list out) except -1
    cdef int _fail_version(self, const unsigned char* v, Py_ssize_t n, list out) except -1
    cdef int _emit(self, list out) except -1
    cdef int _fail(self, int status, str detail, list out) except -1
    cdef int _fail_bare_cr(self, list out) except -1
    cdef int _fail_not_http(self, list out) except -1
    cdef int _fail_request_line_too_long(self, list out) except -1
    cdef int _fail_headers_too_large(self, list out) except -1

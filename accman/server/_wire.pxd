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
    cdef public bint keep_alive
    cdef public bint http10
    cdef public bint head
    cdef public bint loopback_host
    cdef public str allow
    cdef public object error

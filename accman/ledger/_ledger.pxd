# C declarations of accman.ledger._ledger (ext/ledger.pyx) for the compiled
# modules that call the book at C speed: the server's pipelines
# (ext/pipeline.pyx) go through the Lane (ext/lane.pxi), nothing else.

from libc.stdint cimport int64_t


cdef struct Outcome:
    int64_t tot
    int64_t seq
    int64_t wait_no         # 0: final now; else the batch (Batch.no) it waits for


cdef class Lane:
    cdef object book                # the Book
    cdef object committer           # accman.ledger.commit.Committer
    cdef object lock                # the committer's lock
    cdef object clock_ms
    cdef tuple failed_details       # (the failed batch's, the batches' behind it)
    cdef int64_t at_ms
    cdef bint held
    cdef bint closing
    cdef bint queued

    cdef int begin(self) except -1
    cdef int end(self) except -1
    cdef object mod(self, str cred, int64_t by, object min_, str key, object low,
                    object waiter, int64_t* registered, Outcome* out)
    cdef object tot(self, str cred, bint ordered, object waiter, int64_t* registered,
                    Outcome* out)
    cdef int64_t durable_no(self) noexcept
    cdef int64_t failed_no(self) noexcept
    cdef object failure(self, bint behind)

/* pigeon's C fast paths: the local queue's put and get, one item or a batch, each in one
 * call; and, at the end, the log store's syncer thread (see there).
 *
 * Strategy: the same file layout, the same lock and the same commit as the pure-Python
 * path in backends/local/ (queue.py, shared.py: it stays the fallback, and the reference).
 * Each call takes the cross-process lock, copies the records into (or out of) the ring,
 * writes the new state into the spare slot of the control page and publishes it with one
 * single-byte store (release ordering, so the bytes are in place before it), bumps the
 * sequence word and reads whether anyone waits on it, then drops the lock. Anything unusual - no room, growth,
 * shutdown, a record this path does not copy - returns -1/None and the Python path takes
 * over, with nothing changed.
 *
 * The lock: a process-shared, robust pthread mutex in the control page (queue files marked
 * PIGEONQ2). Taking and dropping it uncontended costs two atomic instructions, no system
 * call, and it excludes threads and processes alike. A process SIGKILLed while holding it
 * leaves it to the next taker with EOWNERDEAD (the kernel walks the dead thread's robust
 * list); the taker marks it consistent and goes on, which is safe because the state is
 * double-buffered: a holder that died either published its change (complete) or did not
 * (invisible). Files marked PIGEONQ1 (made where robust mutexes do not exist) use flock on
 * the caller's descriptor instead: pass that descriptor as `fd`; -1 means the mutex.
 *
 * A taker never waits for the GIL while it holds the mutex: it spins with trylock, and if
 * the mutex stays busy it waits for it with the GIL released, drops it at once, takes the
 * GIL back and tries again. Otherwise a thread of this process doing unrelated work could
 * keep every other process out for a whole GIL switch interval.
 *
 * Control page (little-endian): [16] u8 current slot, [24] u32 PUT_SEQ, [28] u32 GET_SEQ,
 * [36] u32 PUT waiters, [40] u32 GET waiters, [64 + 64*slot] the state: five u64 (head,
 * tail, count, unfinished, capacity) and four u32 (special, tombs, flags, marks); [256] the
 * mutex; [512] the intent area of a commit with marks, which only the Python path writes
 * and completes (this path leaves any state with marks to it). Records: u32 length, u16
 * kind, u16 deliveries, payload, padded to 8 bytes; kind 0 is a wrap marker
 * (backends/local/ring.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <signal.h>
#include <string.h>
#include <sys/file.h>

#define OFF_INDEX 16
#define PUT_SEQ 24
#define GET_SEQ 28
#define PUT_WAITERS 36
#define GET_WAITERS 40
#define OFF_SLOTS 64
#define OFF_MUTEX 256
#define MUTEX_ROOM 64
#define SHUTDOWN 1
#define HEADER 8
#define WRAP 0
#define K_PICKLE 1
#define K_BYTES 2
#define K_BYTEARRAY 3
#define K_PICKLE_OOB 4
#define K_SERIALIZED 5
#define LOCK_TRIES 50
#define SPIN_TRIES 200

#if defined(PTHREAD_MUTEX_ROBUST) || defined(__GLIBC__)
#define HAVE_ROBUST 1
#else
#define HAVE_ROBUST 0
#endif

#if HAVE_ROBUST
_Static_assert(sizeof(pthread_mutex_t) <= MUTEX_ROOM, "the mutex must fit its room");
#endif

/* special: records put with a priority, a delay or a ttl; tombs: records taken from the
 * middle of the ring (kind K_TAKEN), still counted in count until the head passes them.
 * While either is non-zero, gets take the Python path (it picks by priority and due time).
 * flags: SHUTDOWN | IMMEDIATE. marks: tombstones a commit published but may not have written
 * yet (the holder died): every call here leaves such a state to the Python path, whose lock
 * completes it first. */
typedef struct {
    uint64_t head, tail, count, unfinished, capacity;
    uint32_t special, tombs, flags, marks;
} state_t;
_Static_assert(sizeof(state_t) == 56, "a state slot is 5 u64 and 4 u32 (layout.STATE)");

/* For the kill tests only: SIGKILL this process after the copy, before the publish. */
static int die_before_publish = 0;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ---- the lock ------------------------------------------------------------------------- */

static int lock_fd(int fd) {
    for (int i = 0; i < LOCK_TRIES; i++) {
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) return 0;
        if (errno != EWOULDBLOCK && errno != EINTR) return -1;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    do { rc = flock(fd, LOCK_EX); } while (rc != 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    return rc;
}

#if HAVE_ROBUST
static inline pthread_mutex_t *mutex_of(uint8_t *ctrl) {
    return (pthread_mutex_t *)(ctrl + OFF_MUTEX);
}

/* 0: locked (a dead holder's lock is recovered); else an errno. Called with the GIL. */
static int lock_mutex(pthread_mutex_t *m) {
    for (;;) {
        for (int i = 0; i < SPIN_TRIES; i++) {
            int rc = pthread_mutex_trylock(m);
            if (rc == EOWNERDEAD) rc = pthread_mutex_consistent(m);
            if (rc != EBUSY) return rc;
            cpu_relax();
        }
        /* Busy for a while: wait for it without the GIL, but never hold it while taking the
         * GIL back (see the strategy above). */
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_lock(m);
        if (rc == EOWNERDEAD) rc = pthread_mutex_consistent(m);
        if (rc == 0) pthread_mutex_unlock(m);
        Py_END_ALLOW_THREADS
        if (rc != 0) return rc;
    }
}
#endif

static int lock_queue(uint8_t *ctrl, int fd) {
    if (fd >= 0) return lock_fd(fd) == 0 ? 0 : errno;
#if HAVE_ROBUST
    return lock_mutex(mutex_of(ctrl));
#else
    return ENOSYS;
#endif
}

static void unlock_queue(uint8_t *ctrl, int fd) {
    if (fd >= 0) {
        flock(fd, LOCK_UN);
        return;
    }
#if HAVE_ROBUST
    pthread_mutex_unlock(mutex_of(ctrl));
#endif
}

static PyObject *lock_error(int rc) {
    errno = rc;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* ---- the ring (the same rules as backends/local/ring.py) ------------------------------- */

static inline void read_state(const uint8_t *ctrl, int idx, state_t *st) {
    memcpy(st, ctrl + OFF_SLOTS + 64 * idx, sizeof *st);
}

static inline void publish(uint8_t *ctrl, int idx, const state_t *st) {
    memcpy(ctrl + OFF_SLOTS + 64 * idx, st, sizeof *st);
    if (die_before_publish) raise(SIGKILL);
    __atomic_store_n(ctrl + OFF_INDEX, (uint8_t)idx, __ATOMIC_RELEASE);
}

static inline uint32_t bump(uint8_t *ctrl, int word, int waiters) {
    __atomic_add_fetch((uint32_t *)(ctrl + word), 1, __ATOMIC_RELEASE);
    return *(volatile uint32_t *)(ctrl + waiters);
}

static inline uint64_t record_size(uint64_t n) { return HEADER + ((n + 7) & ~(uint64_t)7); }

static inline void write_header(uint8_t *at, uint32_t len, uint16_t kind, uint16_t deliveries) {
    memcpy(at, &len, 4);
    memcpy(at + 4, &kind, 2);
    memcpy(at + 6, &deliveries, 2);
}

/* ring.reserve: the offset for a record of n payload bytes (the state advanced), or -1. */
static int64_t reserve(uint8_t *data, state_t *st, uint64_t n) {
    uint64_t rec = record_size(n), pos;
    if (st->count == 0) st->head = st->tail = 0;
    if (st->count && st->tail <= st->head) { /* wrapped */
        if (st->head - st->tail < rec) return -1;
        pos = st->tail;
    } else if (st->capacity - st->tail >= rec) {
        pos = st->tail;
    } else if (st->head >= rec) {
        /* the wrap marker goes in free space: harmless if nothing is published */
        if (st->capacity - st->tail >= HEADER) write_header(data + st->tail, 0, WRAP, 0);
        pos = 0;
    } else {
        return -1;
    }
    st->tail = pos + rec;
    st->count += 1;
    return (int64_t)pos;
}

/* ring.next_record: the oldest record's offset (the state advanced), or -1 if damaged. */
static int64_t next_record(const uint8_t *data, state_t *st, uint32_t *len, uint16_t *kind,
                           uint16_t *deliveries) {
    uint64_t pos = st->capacity - st->head >= HEADER ? st->head : 0;
    memcpy(len, data + pos, 4);
    memcpy(kind, data + pos + 4, 2);
    if (*kind == WRAP) {
        pos = 0;
        memcpy(len, data, 4);
        memcpy(kind, data + 4, 2);
    }
    memcpy(deliveries, data + pos + 6, 2);
    if (pos + record_size(*len) > st->capacity) return -1;
    st->head = pos + record_size(*len);
    st->count -= 1;
    if (st->count == 0) st->head = st->tail = 0;
    return (int64_t)pos;
}

static PyObject *copy_out(const uint8_t *at, uint32_t len, uint16_t kind) {
    if (kind == K_PICKLE || kind == K_BYTES || kind == K_SERIALIZED)
        return PyBytes_FromStringAndSize((const char *)at, len);
    return PyByteArray_FromStringAndSize((const char *)at, len);
}

/* ---- arguments ------------------------------------------------------------------------- */

static int as_u64(PyObject *o, uint64_t *out) {
    *out = PyLong_AsUnsignedLongLong(o);
    return !(*out == (uint64_t)-1 && PyErr_Occurred());
}

static int as_int(PyObject *o, int *out) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return 0;
    *out = (int)v;
    return 1;
}

/* mapped: (data_addr, data_cap), read by the caller as one object, so a thread that remaps
 * the ring meanwhile cannot pair one mapping's address with another's size. */
static int as_mapped(PyObject *o, uint8_t **data, uint64_t *cap) {
    uint64_t addr;
    if (!PyTuple_CheckExact(o) || PyTuple_GET_SIZE(o) != 2) {
        PyErr_SetString(PyExc_TypeError, "mapped must be a (data_addr, data_cap) tuple");
        return 0;
    }
    if (!as_u64(PyTuple_GET_ITEM(o, 0), &addr) || !as_u64(PyTuple_GET_ITEM(o, 1), cap)) return 0;
    *data = (uint8_t *)(uintptr_t)addr;
    return 1;
}

#define CHECK_NARGS(name, n)                                                                  \
    if (nargs != (n)) {                                                                       \
        PyErr_Format(PyExc_TypeError, name "() takes %d arguments (%zd given)", (n), nargs); \
        return NULL;                                                                          \
    }

/* ---- the operations -------------------------------------------------------------------- */

/* put(ctrl_addr, mapped, fd, payload, kind, maxsize) -> -1 | 0 | 1 */
static PyObject *fast_put(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("put", 6);
    uint64_t ctrl_addr, maxsize, data_cap;
    uint8_t *data;
    int fd, kind;
    if (!as_u64(args[0], &ctrl_addr) || !as_mapped(args[1], &data, &data_cap) ||
        !as_int(args[2], &fd) || !as_int(args[4], &kind) || !as_u64(args[5], &maxsize))
        return NULL;
    const char *buf;
    Py_ssize_t n;
    Py_buffer view = {0};
    if (PyBytes_CheckExact(args[3])) {
        buf = PyBytes_AS_STRING(args[3]);
        n = PyBytes_GET_SIZE(args[3]);
    } else {
        if (PyObject_GetBuffer(args[3], &view, PyBUF_SIMPLE) != 0) return NULL;
        buf = view.buf;
        n = view.len;
    }
    uint8_t *ctrl = (uint8_t *)(uintptr_t)ctrl_addr;
    long result = -1;
    int rc = lock_queue(ctrl, fd);
    if (rc != 0) {
        PyBuffer_Release(&view);
        return lock_error(rc);
    }
    int idx = ctrl[OFF_INDEX];
    state_t st;
    read_state(ctrl, idx, &st);
    if (!(st.flags & SHUTDOWN) && !st.marks && st.capacity == data_cap &&
        !(maxsize && st.tombs) && !(maxsize && st.count >= maxsize) &&
        (uint64_t)n <= 0xFFFFFFFFu) {
        int64_t pos = reserve(data, &st, (uint64_t)n);
        if (pos >= 0) {
            memcpy(data + pos + HEADER, buf, (size_t)n);
            write_header(data + pos, (uint32_t)n, (uint16_t)kind, 1);
            st.unfinished += 1;
            publish(ctrl, idx ^ 1, &st);
            result = bump(ctrl, PUT_SEQ, PUT_WAITERS) != 0;
        }
    }
    unlock_queue(ctrl, fd);
    PyBuffer_Release(&view);
    return PyLong_FromLong(result);
}

/* put_many(ctrl_addr, mapped, fd, records, maxsize) -> -1 | 0 | 1
 * records: a list of (kind, [payload]) as LocalQueue._encode makes them; all or none. */
static PyObject *fast_put_many(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("put_many", 5);
    uint64_t ctrl_addr, maxsize, data_cap;
    uint8_t *data;
    int fd;
    if (!as_u64(args[0], &ctrl_addr) || !as_mapped(args[1], &data, &data_cap) ||
        !as_int(args[2], &fd) || !as_u64(args[4], &maxsize))
        return NULL;
    PyObject *records = args[3];
    if (!PyList_CheckExact(records)) {
        PyErr_SetString(PyExc_TypeError, "put_many() records must be a list");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(records);
    /* Only single-part records of bytes or bytearray: anything else takes the Python path. */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *rec = PyList_GET_ITEM(records, i);
        if (!PyTuple_CheckExact(rec) || PyTuple_GET_SIZE(rec) != 2) return PyLong_FromLong(-1);
        PyObject *parts = PyTuple_GET_ITEM(rec, 1);
        if (!PyList_CheckExact(parts) || PyList_GET_SIZE(parts) != 1) return PyLong_FromLong(-1);
        PyObject *p = PyList_GET_ITEM(parts, 0);
        if (!PyBytes_CheckExact(p) && !PyByteArray_CheckExact(p)) return PyLong_FromLong(-1);
        if (!PyLong_CheckExact(PyTuple_GET_ITEM(rec, 0))) return PyLong_FromLong(-1);
    }
    uint8_t *ctrl = (uint8_t *)(uintptr_t)ctrl_addr;
    long result = -1;
    int rc = lock_queue(ctrl, fd);
    if (rc != 0) return lock_error(rc);
    int idx = ctrl[OFF_INDEX];
    state_t st;
    read_state(ctrl, idx, &st);
    if (!(st.flags & SHUTDOWN) && !st.marks && st.capacity == data_cap &&
        !(maxsize && st.tombs) && !(maxsize && st.count + (uint64_t)count > maxsize)) {
        Py_ssize_t i;
        for (i = 0; i < count; i++) {
            PyObject *rec = PyList_GET_ITEM(records, i);
            PyObject *p = PyList_GET_ITEM(PyTuple_GET_ITEM(rec, 1), 0);
            const char *buf;
            Py_ssize_t n;
            if (PyBytes_CheckExact(p)) {
                buf = PyBytes_AS_STRING(p);
                n = PyBytes_GET_SIZE(p);
            } else {
                buf = PyByteArray_AS_STRING(p);
                n = PyByteArray_GET_SIZE(p);
            }
            int64_t pos = (uint64_t)n <= 0xFFFFFFFFu ? reserve(data, &st, (uint64_t)n) : -1;
            if (pos < 0) break; /* nothing published: the Python path waits or grows */
            memcpy(data + pos + HEADER, buf, (size_t)n);
            long kind = PyLong_AsLong(PyTuple_GET_ITEM(rec, 0));
            write_header(data + pos, (uint32_t)n, (uint16_t)kind, 1);
        }
        if (i == count) {
            st.unfinished += (uint64_t)count;
            publish(ctrl, idx ^ 1, &st);
            result = bump(ctrl, PUT_SEQ, PUT_WAITERS) != 0;
        }
    }
    unlock_queue(ctrl, fd);
    return PyLong_FromLong(result);
}

/* get(ctrl_addr, mapped, fd) -> None | (kind, bytes, wake) */
static PyObject *fast_get(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("get", 3);
    uint64_t ctrl_addr, data_cap;
    uint8_t *data;
    int fd;
    if (!as_u64(args[0], &ctrl_addr) || !as_mapped(args[1], &data, &data_cap) ||
        !as_int(args[2], &fd))
        return NULL;
    uint8_t *ctrl = (uint8_t *)(uintptr_t)ctrl_addr;
    int rc = lock_queue(ctrl, fd);
    if (rc != 0) return lock_error(rc);
    PyObject *out = NULL;
    int idx = ctrl[OFF_INDEX];
    state_t st;
    read_state(ctrl, idx, &st);
    if (st.count && st.capacity == data_cap && !st.special && !st.tombs && !st.marks) {
        uint32_t len;
        uint16_t kind, deliveries;
        int64_t pos = next_record(data, &st, &len, &kind, &deliveries);
        /* bytes, pickled, serialized: copied out as one bytes object */
        if (pos >= 0 && (kind == K_PICKLE || kind == K_BYTES || kind == K_SERIALIZED)) {
            PyObject *payload = PyBytes_FromStringAndSize((const char *)data + pos + HEADER, len);
            if (payload == NULL) {
                unlock_queue(ctrl, fd);
                return NULL;
            }
            publish(ctrl, idx ^ 1, &st);
            uint32_t waiters = bump(ctrl, GET_SEQ, GET_WAITERS);
            out = Py_BuildValue("(iNO)", (int)kind, payload, waiters ? Py_True : Py_False);
        }
    }
    unlock_queue(ctrl, fd);
    if (out == NULL && !PyErr_Occurred()) Py_RETURN_NONE;
    return out;
}

/* take(ctrl_addr, mapped, fd, max_items)
 *   -> None | ([(kind, deliveries, payload), ...], wake)   (at least one record) */
static PyObject *fast_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("take", 4);
    uint64_t ctrl_addr, data_cap, max_items;
    uint8_t *data;
    int fd;
    if (!as_u64(args[0], &ctrl_addr) || !as_mapped(args[1], &data, &data_cap) ||
        !as_int(args[2], &fd) || !as_u64(args[3], &max_items))
        return NULL;
    uint8_t *ctrl = (uint8_t *)(uintptr_t)ctrl_addr;
    int rc = lock_queue(ctrl, fd);
    if (rc != 0) return lock_error(rc);
    PyObject *out = NULL, *list = NULL;
    int idx = ctrl[OFF_INDEX];
    state_t st;
    read_state(ctrl, idx, &st);
    if (st.count && st.capacity == data_cap && max_items && !st.special && !st.tombs &&
        !st.marks) {
        uint64_t n = st.count < max_items ? st.count : max_items;
        list = PyList_New((Py_ssize_t)n);
        if (list == NULL) goto done;
        for (uint64_t i = 0; i < n; i++) {
            uint32_t len;
            uint16_t kind, deliveries;
            int64_t pos = next_record(data, &st, &len, &kind, &deliveries);
            if (pos < 0) goto done; /* damaged: let the Python path see it */
            PyObject *payload = copy_out(data + pos + HEADER, len, kind);
            if (payload == NULL) goto done;
            PyObject *rec = Py_BuildValue("(iiN)", (int)kind, (int)deliveries, payload);
            if (rec == NULL) goto done;
            PyList_SET_ITEM(list, (Py_ssize_t)i, rec);
        }
        publish(ctrl, idx ^ 1, &st);
        uint32_t waiters = bump(ctrl, GET_SEQ, GET_WAITERS);
        out = Py_BuildValue("(OO)", list, waiters ? Py_True : Py_False);
    }
done:
    unlock_queue(ctrl, fd);
    Py_XDECREF(list);
    if (out == NULL && !PyErr_Occurred()) Py_RETURN_NONE;
    return out;
}

/* ---- the mutex for the Python path ----------------------------------------------------- */

/* These take the mutex's own address (the control page's + MUTEX_OFFSET), as libc's do
 * through ctypes: a partial of `unlock` and its address is one C call, so a signal handler
 * (KeyboardInterrupt) can only run after the mutex was dropped, never between the Python
 * that decides to drop it and the drop. */
static int mutex_arg(PyObject *arg, pthread_mutex_t **m) {
    uint64_t addr;
    if (!as_u64(arg, &addr)) return 0;
    *m = (pthread_mutex_t *)(uintptr_t)addr;
    return 1;
}

static PyObject *py_init_lock(PyObject *self, PyObject *arg) {
#if HAVE_ROBUST
    pthread_mutex_t *m;
    if (!mutex_arg(arg, &m)) return NULL;
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0) rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0) rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (rc == 0) rc = pthread_mutex_init(m, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0) return lock_error(rc);
    Py_RETURN_NONE;
#else
    return lock_error(ENOSYS);
#endif
}

static PyObject *py_lock(PyObject *self, PyObject *arg) {
#if HAVE_ROBUST
    pthread_mutex_t *m;
    if (!mutex_arg(arg, &m)) return NULL;
    int rc = lock_mutex(m);
    if (rc != 0) return lock_error(rc);
    Py_RETURN_NONE;
#else
    return lock_error(ENOSYS);
#endif
}

/* A robust mutex refuses (EPERM) to be dropped by a thread that does not hold it: the
 * Python path calls this after an interruption whether or not it got the lock. */
static PyObject *py_unlock(PyObject *self, PyObject *arg) {
#if HAVE_ROBUST
    pthread_mutex_t *m;
    if (!mutex_arg(arg, &m)) return NULL;
    pthread_mutex_unlock(m);
#endif
    Py_RETURN_NONE;
}

static PyObject *fast_fault(PyObject *self, PyObject *arg) {
    die_before_publish = PyObject_IsTrue(arg);
    Py_RETURN_NONE;
}

/* --- the log store's syncer (store/log.py, --fsync batch) -------------------------------
 *
 * A thread that never takes the GIL: it waits until the store marks the log dirty, lets
 * fsync_interval pass from that first unsynced write, and fdatasyncs the active segment.
 * A Python thread doing the same wakes the interpreter at each step and takes the GIL from
 * the event loop's thread (GIL hand-offs: futex calls and stalls in the loop's thread per
 * put); this one costs the loop's thread one uncontended mutex per interval.
 *
 * Two mutexes: `state` (the dirty flag, never held across I/O: `dirty()` never waits for a
 * disk) and `io` (held around every fsync of the log, this thread's and the loop thread's
 * - the store's fsync lock - and while the store switches the active segment's descriptor,
 * so no fsync runs on a descriptor being closed). A failed fdatasync sets `error` (errno)
 * under `io` and ends the thread: the store reads it under `io` before any fsync of its own
 * and before it confirms a write, and breaks ("fsyncgate": the kernel reports a writeback
 * error once). The store calls one syncer pass's worth of this in Python when the module is
 * missing (Durable._syncer), and that Python pass is what the crash model runs.
 */
typedef struct {
    pthread_mutex_t state, io;
    pthread_cond_t wake;
    pthread_t thread;
    int started, closing, dirty, fd, error;
    long long fsyncs;
    double interval;
    struct timespec first;
} Syncer;

static void syncer_free(PyObject *capsule);

static Syncer *syncer_arg(PyObject *arg) {
    return (Syncer *)PyCapsule_GetPointer(arg, "pigeon.syncer");
}

/* One pass: fdatasync the active segment under `io`, unless an earlier one failed; a
 * failure is kept in `error`. With `call` (the crash model's: Python, under the GIL) that
 * callable does the fdatasync instead, an OSError its failure. Returns 1 if failed. */
static int syncer_once(Syncer *s, PyObject *call) {
    pthread_mutex_lock(&s->io);
    if (s->error == 0 && s->fd >= 0) {
        int err = 0;
        if (call == NULL) {
            if (fdatasync(s->fd) != 0) err = errno ? errno : EIO;
        } else {
            PyObject *r = PyObject_CallFunction(call, "i", s->fd);
            if (r == NULL) {
                err = EIO;
                if (PyErr_ExceptionMatches(PyExc_OSError)) {
                    PyObject *type, *value, *tb;
                    PyErr_Fetch(&type, &value, &tb);
                    PyObject *no = value ? PyObject_GetAttrString(value, "errno") : NULL;
                    if (no != NULL && PyLong_Check(no)) err = (int)PyLong_AsLong(no);
                    Py_XDECREF(no);
                    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
                }
                PyErr_Clear();
            }
            Py_XDECREF(r);
        }
        if (err) __atomic_store_n(&s->error, err, __ATOMIC_RELEASE);
        else __atomic_add_fetch(&s->fsyncs, 1, __ATOMIC_RELAXED);
    }
    int failed = s->error != 0;
    pthread_mutex_unlock(&s->io);
    return failed;
}

static void *syncer_run(void *arg) {
    Syncer *s = (Syncer *)arg;
    pthread_mutex_lock(&s->state);
    for (;;) {
        while (!s->closing && !s->dirty) pthread_cond_wait(&s->wake, &s->state);
        if (s->closing) break;
        struct timespec until = s->first;
        long long ns = (long long)(s->interval * 1e9);
        until.tv_sec += ns / 1000000000LL;
        until.tv_nsec += ns % 1000000000LL;
        if (until.tv_nsec >= 1000000000L) { until.tv_sec += 1; until.tv_nsec -= 1000000000L; }
        while (!s->closing && pthread_cond_timedwait(&s->wake, &s->state, &until) != ETIMEDOUT) {}
        if (s->closing) break;  /* the store's close() fsyncs what is left itself */
        s->dirty = 0;  /* a write from now on is covered by this fdatasync or marks again */
        pthread_mutex_unlock(&s->state);
        int failed = syncer_once(s, NULL);
        pthread_mutex_lock(&s->state);
        if (failed) break;
    }
    pthread_mutex_unlock(&s->state);
    return NULL;
}

static PyObject *py_syncer_new(PyObject *self, PyObject *arg) {
    double interval = PyFloat_AsDouble(arg);
    if (interval == -1.0 && PyErr_Occurred()) return NULL;
    if (!(interval >= 0.0) || interval > 3600.0) {
        PyErr_SetString(PyExc_ValueError, "the fsync interval must be 0 to 3600 seconds");
        return NULL;
    }
    Syncer *s = PyMem_RawCalloc(1, sizeof(Syncer));
    if (s == NULL) return PyErr_NoMemory();
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->wake, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&s->state, NULL);
    pthread_mutex_init(&s->io, NULL);
    s->fd = -1;
    s->interval = interval;
    PyObject *c = PyCapsule_New(s, "pigeon.syncer", syncer_free);
    if (c == NULL) PyMem_RawFree(s);
    return c;
}

static PyObject *py_syncer_start(PyObject *self, PyObject *arg) {
    Syncer *s = syncer_arg(arg);
    if (s == NULL) return NULL;
    if (s->started) Py_RETURN_NONE;
    /* No signal for this thread: the broker's signal handlers run in the main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&s->thread, NULL, syncer_run, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    s->started = 1;
    Py_RETURN_NONE;
}

static PyObject *py_syncer_dirty(PyObject *self, PyObject *arg) {
    /* A write reached the OS: fdatasync within the interval. Returns the errno of a failed
     * fdatasync (0: none) - read without `io`: the store reads it again under `io`. */
    Syncer *s = syncer_arg(arg);
    if (s == NULL) return NULL;
    if (!s->dirty) {  /* only this thread sets it; the syncer clears it under `state` */
        pthread_mutex_lock(&s->state);
        if (!s->dirty) {
            s->dirty = 1;
            clock_gettime(CLOCK_MONOTONIC, &s->first);
            pthread_cond_signal(&s->wake);
        }
        pthread_mutex_unlock(&s->state);
    }
    return PyLong_FromLong(__atomic_load_n(&s->error, __ATOMIC_ACQUIRE));
}

static PyObject *py_syncer_lock(PyObject *self, PyObject *arg) {
    /* Take `io` (the store's fsync lock); waits with the GIL released. Returns the errno
     * of a failed fdatasync of the syncer's (0: none), read under the lock. */
    Syncer *s = syncer_arg(arg);
    if (s == NULL) return NULL;
    if (pthread_mutex_trylock(&s->io) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&s->io);
        Py_END_ALLOW_THREADS
    }
    return PyLong_FromLong(s->error);
}

static PyObject *py_syncer_unlock(PyObject *self, PyObject *arg) {
    Syncer *s = syncer_arg(arg);
    if (s == NULL) return NULL;
    pthread_mutex_unlock(&s->io);
    Py_RETURN_NONE;
}

static PyObject *py_syncer_set_fd(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    /* The descriptor to fdatasync from now on; the caller holds `io` (syncer_lock). */
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "syncer_set_fd(syncer, fd)");
        return NULL;
    }
    Syncer *s = syncer_arg(args[0]);
    if (s == NULL) return NULL;
    long fd = PyLong_AsLong(args[1]);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    s->fd = (int)fd;
    Py_RETURN_NONE;
}

static PyObject *py_syncer_fsyncs(PyObject *self, PyObject *arg) {
    Syncer *s = syncer_arg(arg);
    if (s == NULL) return NULL;
    return PyLong_FromLongLong(__atomic_load_n(&s->fsyncs, __ATOMIC_RELAXED));
}

static PyObject *py_syncer_pass(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    /* The crash model's pass of the thread (never started there): `fsync(fd)` in the
     * thread's place, under its lock. Returns True if it (or an earlier pass) failed. */
    if (n != 2 || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "syncer_pass(syncer, fsync)");
        return NULL;
    }
    Syncer *s = syncer_arg(args[0]);
    if (s == NULL) return NULL;
    if (s->started) {
        PyErr_SetString(PyExc_RuntimeError, "the syncer's thread runs: no pass by hand");
        return NULL;
    }
    return PyBool_FromLong(syncer_once(s, args[1]));
}

static PyObject *py_syncer_error(PyObject *self, PyObject *arg) {
    Syncer *s = syncer_arg(arg);
    if (s == NULL) return NULL;
    return PyLong_FromLong(__atomic_load_n(&s->error, __ATOMIC_ACQUIRE));
}

static void syncer_stop(Syncer *s) {
    pthread_mutex_lock(&s->state);
    s->closing = 1;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->state);
    if (s->started) {
        pthread_join(s->thread, NULL);
        s->started = 0;
    }
}

static PyObject *py_syncer_close(PyObject *self, PyObject *arg) {
    /* Stop the thread (an fdatasync under way ends first); the GIL is released meanwhile. */
    Syncer *s = syncer_arg(arg);
    if (s == NULL) return NULL;
    Py_BEGIN_ALLOW_THREADS
    syncer_stop(s);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void syncer_free(PyObject *capsule) {
    Syncer *s = (Syncer *)PyCapsule_GetPointer(capsule, "pigeon.syncer");
    if (s == NULL) return;
    syncer_stop(s);  /* never takes the GIL: joining it cannot deadlock */
    pthread_cond_destroy(&s->wake);
    pthread_mutex_destroy(&s->state);
    pthread_mutex_destroy(&s->io);
    PyMem_RawFree(s);
}

static PyMethodDef methods[] = {
    {"_die_before_publish", fast_fault, METH_O, "Kill tests: SIGKILL before the next publish."},
    {"put", (PyCFunction)(void (*)(void))fast_put, METH_FASTCALL,
     "Put one record; -1: take the Python path, else 1 if a getter waits."},
    {"put_many", (PyCFunction)(void (*)(void))fast_put_many, METH_FASTCALL,
     "Put records, all or none; -1: take the Python path, else 1 if a getter waits."},
    {"get", (PyCFunction)(void (*)(void))fast_get, METH_FASTCALL,
     "Get one record: (kind, bytes, wake), or None: take the Python path."},
    {"take", (PyCFunction)(void (*)(void))fast_take, METH_FASTCALL,
     "Take up to max_items records: ([(kind, deliveries, payload)], wake), or None."},
    {"init_lock", py_init_lock, METH_O, "Make the robust process-shared mutex at an address."},
    {"lock", py_lock, METH_O, "Take the mutex at an address (a dead holder's is recovered)."},
    {"unlock", py_unlock, METH_O, "Drop the mutex at an address (a no-op if not held)."},
    {"syncer_new", py_syncer_new, METH_O, "A log syncer with this fsync interval (s)."},
    {"syncer_start", py_syncer_start, METH_O, "Start the syncer's thread."},
    {"syncer_dirty", py_syncer_dirty, METH_O, "A write reached the OS; returns errno or 0."},
    {"syncer_lock", py_syncer_lock, METH_O, "Take the fsync lock; returns errno or 0."},
    {"syncer_unlock", py_syncer_unlock, METH_O, "Drop the fsync lock."},
    {"syncer_set_fd", (PyCFunction)(void (*)(void))py_syncer_set_fd, METH_FASTCALL,
     "The descriptor to fdatasync (with the fsync lock held)."},
    {"syncer_pass", (PyCFunction)(void (*)(void))py_syncer_pass, METH_FASTCALL,
     "One pass of the thread, by hand, with this fsync (the crash model's)."},
    {"syncer_error", py_syncer_error, METH_O, "The errno of a failed fdatasync, or 0."},
    {"syncer_fsyncs", py_syncer_fsyncs, METH_O, "fdatasyncs the thread has made."},
    {"syncer_close", py_syncer_close, METH_O, "Stop the syncer's thread."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastring", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastring(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "ROBUST", HAVE_ROBUST) < 0 ||
        PyModule_AddIntConstant(m, "MUTEX_OFFSET", OFF_MUTEX) < 0 ||
        PyModule_AddIntConstant(m, "MUTEX_ROOM", MUTEX_ROOM) < 0 ||
        PyModule_AddIntConstant(m, "MUTEX_SIZE", (long)sizeof(pthread_mutex_t)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* The local queue's hot path in C: put one item, get one item, each in one call.
 *
 * Strategy: the same file layout, the same lock and the same commit as the pure-Python
 * path in backends/local.py (which stays the fallback, and the reference): the caller holds
 * the queue handle's thread lock; here we take the cross-process flock, copy the record
 * into the ring, write the new state into the spare slot of the control page and publish it
 * with one single-byte store (release ordering, so the bytes are in place before it), bump
 * the sequence word and read whether anyone waits on it, then drop the flock. A process
 * SIGKILLed anywhere in here leaves no lock held (the kernel drops flock locks with the
 * process) and no torn item (before the publish, the record is invisible; after, complete).
 * Anything unusual - a wrapped ring, no room, growth, shutdown, a record kind this path does
 * not copy - returns -1/None and the Python path takes over, with nothing changed.
 *
 * Control page (little-endian): [16] u8 current slot, [20] u8 flags, [24] u32 PUT_SEQ,
 * [28] u32 GET_SEQ, [36] u32 PUT waiters, [40] u32 GET waiters, [64 + 64*slot] five u64:
 * head, tail, count, unfinished, capacity. Records: u32 length, u16 kind, u16 deliveries,
 * payload, padded to 8 bytes; kind 0 is a wrap marker.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <signal.h>
#include <string.h>
#include <sys/file.h>

#define OFF_INDEX 16
#define OFF_FLAGS 20
#define PUT_SEQ 24
#define GET_SEQ 28
#define PUT_WAITERS 36
#define GET_WAITERS 40
#define OFF_SLOTS 64
#define SHUTDOWN 1
#define HEADER 8
#define WRAP 0
#define LOCK_TRIES 50

typedef struct { uint64_t head, tail, count, unfinished, capacity; } state_t;

/* For the kill tests only: SIGKILL this process after the copy, before the publish. */
static int die_before_publish = 0;

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

/* put(ctrl_addr, data_addr, fd, payload, kind, maxsize, data_cap) -> -1 | 0 | 1 */
static PyObject *fast_put(PyObject *self, PyObject *args) {
    unsigned long long ctrl_addr, data_addr, maxsize, data_cap;
    int fd, kind;
    Py_buffer payload;
    if (!PyArg_ParseTuple(args, "KKiy*iKK", &ctrl_addr, &data_addr, &fd, &payload, &kind,
                          &maxsize, &data_cap))
        return NULL;
    uint8_t *ctrl = (uint8_t *)(uintptr_t)ctrl_addr, *data = (uint8_t *)(uintptr_t)data_addr;
    uint64_t n = (uint64_t)payload.len, size = HEADER + ((n + 7) & ~(uint64_t)7);
    long result = -1;
    if (lock_fd(fd) != 0) {
        PyBuffer_Release(&payload);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int idx = ctrl[OFF_INDEX];
    state_t st;
    read_state(ctrl, idx, &st);
    if (!(ctrl[OFF_FLAGS] & SHUTDOWN) && st.capacity == data_cap &&
        !(maxsize && st.count >= maxsize) && n <= 0xFFFFFFFFu) {
        if (st.count == 0) st.head = st.tail = 0;
        if ((st.count == 0 || st.tail > st.head) && st.capacity - st.tail >= size) {
            uint8_t *rec = data + st.tail;
            memcpy(rec + HEADER, payload.buf, n);
            uint32_t len32 = (uint32_t)n;
            uint16_t kind16 = (uint16_t)kind, deliveries = 1;
            memcpy(rec, &len32, 4);
            memcpy(rec + 4, &kind16, 2);
            memcpy(rec + 6, &deliveries, 2);
            st.tail += size;
            st.count += 1;
            st.unfinished += 1;
            publish(ctrl, idx ^ 1, &st);
            result = bump(ctrl, PUT_SEQ, PUT_WAITERS) != 0;
        }
    }
    flock(fd, LOCK_UN);
    PyBuffer_Release(&payload);
    return PyLong_FromLong(result);
}

/* get(ctrl_addr, data_addr, fd, data_cap) -> None | (kind, bytes, wake) */
static PyObject *fast_get(PyObject *self, PyObject *args) {
    unsigned long long ctrl_addr, data_addr, data_cap;
    int fd;
    if (!PyArg_ParseTuple(args, "KKiK", &ctrl_addr, &data_addr, &fd, &data_cap)) return NULL;
    uint8_t *ctrl = (uint8_t *)(uintptr_t)ctrl_addr, *data = (uint8_t *)(uintptr_t)data_addr;
    if (lock_fd(fd) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *out = NULL;
    int idx = ctrl[OFF_INDEX];
    state_t st;
    read_state(ctrl, idx, &st);
    if (st.count && st.capacity == data_cap) {
        uint64_t pos = st.capacity - st.head >= HEADER ? st.head : 0;
        uint32_t len;
        uint16_t kind;
        memcpy(&len, data + pos, 4);
        memcpy(&kind, data + pos + 4, 2);
        if (kind == WRAP) {
            pos = 0;
            memcpy(&len, data, 4);
            memcpy(&kind, data + 4, 2);
        }
        /* bytes, pickled, serialized: copied out as one bytes object */
        if ((kind == 1 || kind == 2 || kind == 5) && pos + HEADER + len <= st.capacity) {
            PyObject *payload = PyBytes_FromStringAndSize((const char *)data + pos + HEADER, len);
            if (payload == NULL) {
                flock(fd, LOCK_UN);
                return NULL;
            }
            st.count -= 1;
            if (st.count) {
                st.head = pos + HEADER + (((uint64_t)len + 7) & ~(uint64_t)7);
            } else {
                st.head = st.tail = 0;
            }
            publish(ctrl, idx ^ 1, &st);
            uint32_t waiters = bump(ctrl, GET_SEQ, GET_WAITERS);
            out = Py_BuildValue("(iNO)", (int)kind, payload, waiters ? Py_True : Py_False);
        }
    }
    flock(fd, LOCK_UN);
    if (out == NULL && !PyErr_Occurred()) Py_RETURN_NONE;
    return out;
}

static PyObject *fast_fault(PyObject *self, PyObject *arg) {
    die_before_publish = PyObject_IsTrue(arg);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"_die_before_publish", fast_fault, METH_O, "Kill tests: SIGKILL before the next publish."},
    {"put", fast_put, METH_VARARGS, "Put one record; -1: take the Python path, else 1 if a getter waits."},
    {"get", fast_get, METH_VARARGS, "Get one record: (kind, bytes, wake), or None: take the Python path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastring", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastring(void) { return PyModule_Create(&module); }
